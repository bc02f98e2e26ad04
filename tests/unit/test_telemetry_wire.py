"""The batch wire format round-trips every sample kind (encode caches field names per class)."""

from __future__ import annotations

import msgpack
import pytest

from netkv.contracts.samples import NicSample, QdiscSample, RdmaSample, RttSample
from netkv.contracts.wire import Batch, decode_batch, encode_batch

pytestmark = pytest.mark.unit

SAMPLES: tuple[NicSample | QdiscSample | RdmaSample | RttSample, ...] = (
    NicSample(reporter="h000", nic="eth0", ts=1.0, window_s=0.5, tx_bytes_s=1.0,
              rx_bytes_s=2.0, tx_packets_s=3.0, rx_packets_s=4.0, drops_s=0.0, errors_s=0.0,
              capacity_bps=5.0, oper_up=True),
    QdiscSample(reporter="h000", nic="eth0", ts=1.0, window_s=0.5, backlog_bytes=7.0,
                backlog_packets=1.0, drops_s=0.5),
    RdmaSample(reporter="h000", device="mlx5_0", port=1, ts=1.0, window_s=0.5,
               tx_bytes_s=1.0, rx_bytes_s=2.0, cnp_sent_s=0.0, cnp_handled_s=0.0,
               ecn_marked_s=0.0, xmit_wait_s=0.0),
    RttSample(reporter="h000", peer="h001", ts=1.0, window_s=0.5, sent=3, lost=1,
              srtt_s=1e-4, p50_s=1e-4, p99_s=2e-4, min_s=9e-5),
)


def test_every_sample_kind_round_trips_with_all_its_fields() -> None:
    batch = Batch("h000", 7, 1.0, SAMPLES)
    for _ in range(2):  # the second encode uses the cached field names
        data = encode_batch(batch)
        assert decode_batch(data) == batch
    raw = msgpack.unpackb(data)
    for body, sample in zip(raw["samples"], SAMPLES, strict=True):
        assert list(body) == ["k", *sample.__struct_fields__]
