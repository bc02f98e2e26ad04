"""The RDMA reader on sysfs trees laid out by the test (no RDMA NIC on this machine).

The trees follow the kernel ABI (Documentation/ABI/stable/sysfs-class-infiniband) with mlx5
counter names: an InfiniBand port (no CNP counters) and a RoCE port (hw_counters present).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from netkv_agent.rdma import RdmaReader, RdmaReading, discover_ports, parse_rate, read_port

pytestmark = pytest.mark.unit

IB_COUNTERS = ("port_xmit_data", "port_rcv_data", "port_xmit_packets", "port_rcv_packets",
               "port_xmit_wait", "port_xmit_discards", "port_rcv_errors")
HW_COUNTERS = ("np_cnp_sent", "rp_cnp_handled", "np_ecn_marked_roce_packets", "rp_cnp_ignored",
               "out_of_sequence", "packet_seq_err", "local_ack_timeout_err", "out_of_buffer")


class FakeSysfs:
    """Writes /sys/class/infiniband-shaped trees under a temp root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def port(self, device: str, port: int, *, link_layer: str, rate: str,
             hw: bool) -> Path:
        base = self.root / device / "ports" / str(port)
        (base / "counters").mkdir(parents=True)
        (base / "link_layer").write_text(link_layer + "\n")
        (base / "rate").write_text(rate + "\n")
        (base / "state").write_text("4: ACTIVE\n")
        for name in IB_COUNTERS:
            (base / "counters" / name).write_text("0\n")
        if hw:
            (base / "hw_counters").mkdir()
            (base / "hw_counters" / "lifespan").write_text("10\n")
            for name in HW_COUNTERS:
                (base / "hw_counters" / name).write_text("0\n")
        return base

    def set(self, device: str, port: int, **values: int) -> None:
        base = self.root / device / "ports" / str(port)
        for name, value in values.items():
            sub = "counters" if name.startswith("port_") else "hw_counters"
            (base / sub / name).write_text(f"{value}\n")


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    tree = FakeSysfs(tmp_path / "infiniband")
    tree.port("mlx5_0", 1, link_layer="Ethernet", rate="200 Gb/sec (4X HDR)", hw=True)
    tree.port("mlx5_1", 1, link_layer="InfiniBand", rate="400 Gb/sec (4X NDR)", hw=False)
    return tree


def test_parse_rate() -> None:
    assert parse_rate("400 Gb/sec (4X NDR)") == pytest.approx(50e9)
    assert parse_rate("2.5 Gb/sec (1X SDR)") == pytest.approx(2.5e9 / 8)
    assert parse_rate("garbage") == 0.0


def test_discovery_and_port_metadata(sysfs: FakeSysfs) -> None:
    assert discover_ports(sysfs.root) == [("mlx5_0", 1), ("mlx5_1", 1)]
    assert discover_ports(sysfs.root, ["mlx5_1"]) == [("mlx5_1", 1)]
    assert discover_ports(sysfs.root / "absent") == []
    roce = read_port(sysfs.root, "mlx5_0", 1)
    ib = read_port(sysfs.root, "mlx5_1", 1)
    assert roce is not None and ib is not None
    assert roce.is_roce and not ib.is_roce
    assert ib.rate_bytes_s == pytest.approx(50e9)
    assert "np_cnp_sent" in ib.missing and not roce.missing


def test_roce_rates_data_words_are_four_bytes(sysfs: FakeSysfs) -> None:
    reader = RdmaReader("h000", str(sysfs.root), ["mlx5_0"])
    assert reader.ingest(_reading(sysfs, "mlx5_0"), 10.0, 1e9) is None  # baseline
    # 0.5 s later: 1e9 words sent (4e9 bytes), 2.5e8 words received, congestion counters move
    sysfs.set("mlx5_0", 1, port_xmit_data=1_000_000_000, port_rcv_data=250_000_000,
              np_cnp_sent=50, rp_cnp_handled=20, np_ecn_marked_roce_packets=400,
              port_xmit_wait=1000)
    sample = reader.ingest(_reading(sysfs, "mlx5_0"), 10.5, 1e9)
    assert sample is not None
    assert sample.reporter == "h000" and sample.device == "mlx5_0" and sample.port == 1
    assert sample.window_s == pytest.approx(0.5)
    assert sample.tx_bytes_s == pytest.approx(8e9)
    assert sample.rx_bytes_s == pytest.approx(2e9)
    assert sample.cnp_sent_s == pytest.approx(100.0)
    assert sample.cnp_handled_s == pytest.approx(40.0)
    assert sample.ecn_marked_s == pytest.approx(800.0)
    assert sample.xmit_wait_s == pytest.approx(2000.0)


def test_infiniband_port_without_cnp_counters(sysfs: FakeSysfs) -> None:
    reader = RdmaReader("h000", str(sysfs.root), ["mlx5_1"])
    reader.ingest(_reading(sysfs, "mlx5_1"), 0.0, 1e9)
    sysfs.set("mlx5_1", 1, port_xmit_data=250, port_rcv_data=500, port_xmit_wait=77)
    sample = reader.ingest(_reading(sysfs, "mlx5_1"), 1.0, 1e9)
    assert sample is not None
    assert (sample.tx_bytes_s, sample.rx_bytes_s) == (1000.0, 2000.0)
    assert sample.cnp_sent_s == sample.cnp_handled_s == sample.ecn_marked_s == 0.0
    assert sample.xmit_wait_s == 77.0


def test_counter_reset_drops_interval_and_recovers(sysfs: FakeSysfs) -> None:
    reader = RdmaReader("h000", str(sysfs.root), ["mlx5_0"])
    sysfs.set("mlx5_0", 1, port_xmit_data=10_000_000)
    reader.ingest(_reading(sysfs, "mlx5_0"), 0.0, 1e9)
    sysfs.set("mlx5_0", 1, port_xmit_data=20_000_000)
    assert reader.ingest(_reading(sysfs, "mlx5_0"), 1.0, 1e9) is not None
    # driver reload: everything back to zero-ish
    sysfs.set("mlx5_0", 1, port_xmit_data=100)
    assert reader.ingest(_reading(sysfs, "mlx5_0"), 2.0, 1e9) is None
    assert reader.resets == 1
    sysfs.set("mlx5_0", 1, port_xmit_data=350)
    sample = reader.ingest(_reading(sysfs, "mlx5_0"), 3.0, 1e9)
    assert sample is not None and sample.tx_bytes_s == pytest.approx(1000.0)
    assert sample.tx_bytes_s >= 0


def test_32bit_xmit_wait_wraps(sysfs: FakeSysfs) -> None:
    reader = RdmaReader("h000", str(sysfs.root), ["mlx5_0"])
    sysfs.set("mlx5_0", 1, port_xmit_wait=(1 << 32) - 50)
    reader.ingest(_reading(sysfs, "mlx5_0"), 0.0, 1e9)
    sysfs.set("mlx5_0", 1, port_xmit_wait=50)
    sample = reader.ingest(_reading(sysfs, "mlx5_0"), 1.0, 1e9)
    assert sample is not None and sample.xmit_wait_s == pytest.approx(100.0)
    assert reader.wraps == 1


def test_read_walks_all_ports_and_configurable_unit(sysfs: FakeSysfs) -> None:
    reader = RdmaReader("h007", str(sysfs.root), data_unit_bytes=1)
    assert reader.read(now=0.0, wall=1e9) == []
    sysfs.set("mlx5_0", 1, port_xmit_data=100)
    sysfs.set("mlx5_1", 1, port_xmit_data=300)
    samples = reader.read(now=1.0, wall=1e9)
    assert {(s.device, s.tx_bytes_s) for s in samples} == {("mlx5_0", 100.0),
                                                          ("mlx5_1", 300.0)}
    assert all(s.reporter == "h007" for s in samples)


def test_unreadable_counter_is_missing_not_a_crash(sysfs: FakeSysfs) -> None:
    (sysfs.root / "mlx5_0/ports/1/hw_counters/np_cnp_sent").write_text("not a number\n")
    reading = read_port(sysfs.root, "mlx5_0", 1)
    assert reading is not None and "np_cnp_sent" in reading.missing
    assert read_port(sysfs.root, "mlx5_9", 1) is None


def _reading(sysfs: FakeSysfs, device: str) -> RdmaReading:
    reading = read_port(sysfs.root, device, 1)
    assert reading is not None
    return reading
