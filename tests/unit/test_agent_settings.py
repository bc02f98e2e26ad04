"""Agent settings, link bindings and registry entries: validated once, errors name fields."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from netkv_agent.agent import Agent
from netkv_agent.bindings import link_bindings
from netkv_agent.settings import AgentSettings, NicBinding, load_agent_settings
from netkv_oracle.identity import binding_from_registration

from netkv.contracts.registration import (
    LinkPair,
    Registration,
    RegistrationError,
    decode_registration,
    encode_registration,
)
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError

pytestmark = pytest.mark.unit

TOPO = parse_topology({"fat_tree": {"pods": 1, "leaves_per_pod": 2, "hosts_per_leaf": 2}})


def test_file_env_and_flags_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "netkv.yaml"
    cfg.write_text("redis: {url: 'redis://127.0.0.1:7000/0'}\n"
                   "agent: {agent_id: h001, probe_interval_leaf_s: 0.2, fabric_nic: eth0,\n"
                   "        nic_speed_gbps: {eth0: 100}}\n")
    env = {"NETKV_PROBE_INTERVAL_LEAF_S": "0.05", "NETKV_AGENT_ID": "h002"}
    s = load_agent_settings(cfg, env, {"agent_id": "h003", "listen_address": None})
    assert s.agent_id == "h003"  # flag beats env beats file
    assert s.probe_interval_leaf_s == 0.05
    assert s.redis.url == "redis://127.0.0.1:7000/0"
    assert s.interfaces == ("eth0",) and s.nic_speed_gbps == {"eth0": 100.0}


@pytest.mark.parametrize(("body", "field"), [
    ("{agent_id: h0, probe_interval_leaf_s: 0}", "probe_interval_leaf_s"),
    ("{agent_id: h0, bogus: 1}", "bogus"),
    ("{agent_id: h0, echo_port: 70000}", "echo_port"),
    ("{agent_id: h0, rdma_fabric_port: mlx5_0}", "rdma_fabric_port"),
    ("{agent_id: h0, nic_speed_gbps: {eth0: -1}}", "nic_speed_gbps"),
])
def test_bad_settings_name_the_field(tmp_path: Path, body: str, field: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"agent: {body}\n")
    with pytest.raises(InputError, match=field):
        load_agent_settings(cfg, {})


def test_fabric_nic_maps_to_own_nic_links() -> None:
    s = AgentSettings(agent_id="h001", fabric_nic="eth0", rdma_fabric_port="mlx5_0/1")
    nics, rdma = link_bindings(s, TOPO)
    assert nics == {"eth0": LinkPair("h001/nic/up", "h001/nic/down")}
    assert rdma == {"mlx5_0/1": LinkPair("h001/nic/up", "h001/nic/down")}


def test_switch_agent_binds_its_leaf_links_but_not_others() -> None:
    ok = AgentSettings(agent_id="leaf0.0",
                       nic_links={"swp1": NicBinding("leaf0.0/up", "leaf0.0/down")})
    assert link_bindings(ok, TOPO)[0]["swp1"] == LinkPair("leaf0.0/up", "leaf0.0/down")
    stolen = AgentSettings(agent_id="h000",
                           nic_links={"eth1": NicBinding("h001/nic/up", "h001/nic/down")})
    with pytest.raises(InputError, match="belongs to 'h001'"):
        link_bindings(stolen, TOPO)
    unknown = AgentSettings(agent_id="h000", nic_links={"x": NicBinding("nope", "nope")})
    with pytest.raises(InputError, match="unknown topology link"):
        link_bindings(unknown, TOPO)


def test_switch_uplink_nic_registers_its_own_links_under_any_port_name() -> None:
    s = AgentSettings(agent_id="leaf0.1", uplink_nic="swp49", nics=("swp1",))
    assert s.interfaces == ("swp1", "swp49")
    nics, rdma = link_bindings(s, TOPO)
    assert nics == {"swp49": LinkPair("leaf0.1/up", "leaf0.1/down")} and rdma == {}
    host = AgentSettings(agent_id="h000", uplink_nic="eth0")  # a host has no <h000>/up
    with pytest.raises(InputError, match="uplink_nic"):
        link_bindings(host, TOPO)
    with pytest.raises(InputError, match="uplink_nic"):
        AgentSettings(agent_id="leaf0.0", fabric_nic="eth0", uplink_nic="swp49")


def test_agent_identity_must_be_a_topology_node() -> None:
    with pytest.raises(InputError, match="agent_id"):
        Agent(AgentSettings(agent_id="h999"), TOPO)
    with pytest.raises(InputError, match="agent_id"):
        Agent(AgentSettings(), TOPO)
    Agent(AgentSettings(agent_id="pod0"), TOPO)  # a pod-level switch agent is fine


def test_switch_agent_registration_is_what_the_oracle_accepts() -> None:
    """The switch agent's registry entry round-trips into an oracle binding of its port."""
    agent = Agent(AgentSettings(agent_id="leaf0.1", uplink_nic="swp49"), TOPO)
    reg = agent.registration()
    assert reg.nics == ("swp49",)
    assert reg.links == {"swp49": LinkPair("leaf0.1/up", "leaf0.1/down")}
    binding = binding_from_registration(TOPO, "leaf0.1", encode_registration(reg))
    assert binding.links["swp49"] == (TOPO.link_index["leaf0.1/up"],
                                       TOPO.link_index["leaf0.1/down"])


def _reg() -> Registration:
    return Registration(agent="h001", address="127.0.0.11", echo_port=4000, version="0.1.0",
                        started=1.7e9, nics=("eth0",),
                        links={"eth0": LinkPair("h001/nic/up", "h001/nic/down")})


def test_registration_round_trip() -> None:
    assert decode_registration(encode_registration(_reg())) == _reg()


@pytest.mark.parametrize(("patch", "where"), [
    ({"v": 2}, "registration.v"),
    ({"address": "not-an-ip"}, "registration.address"),
    ({"echo_port": 70000}, "registration.echo_port"),
    ({"agent": "bad name!"}, "registration.agent"),
    ({"links": {"eth0": {"tx": "a"}}}, "registration.links.eth0"),
    ({"extra": 1}, "registration.extra"),
    ({"started": float("nan")}, "registration.started"),
])
def test_registration_rejects_malformed(patch: dict[str, object], where: str) -> None:
    raw = msgpack.unpackb(encode_registration(_reg()))
    raw.update(patch)
    with pytest.raises(RegistrationError) as info:
        decode_registration(msgpack.packb(raw))
    assert info.value.where == where


def test_registration_rejects_garbage() -> None:
    with pytest.raises(RegistrationError):
        decode_registration(b"\xc1\x00garbage")
    with pytest.raises(RegistrationError):
        decode_registration(msgpack.packb([1, 2, 3]))


def test_cli_flags_beat_environment() -> None:
    import argparse

    from netkv_agent.cli import configure, settings_from_args

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--agent-id", "h001", "--redis-url", "redis://127.0.0.1:7001/0",
                              "--mqtt-port", "1999"])
    args.environ = {"NETKV_REDIS__URL": "redis://127.0.0.1:9/0", "NETKV_MQTT__PORT": "9",
                    "NETKV_MQTT__HOST": "127.0.0.5", "NETKV_AGENT_ID": "h002"}
    s = settings_from_args(args)
    assert s.agent_id == "h001"
    assert s.redis.url == "redis://127.0.0.1:7001/0"
    assert s.mqtt.port == 1999 and s.mqtt.host == "127.0.0.5"  # unflagged env still applies
