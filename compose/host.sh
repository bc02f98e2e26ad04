#!/bin/sh
# A GPU host of the compose testbed: shape the rack NIC with tbf (NET_ADMIN), route the other
# racks via the spine, then run the NetKV agent and the host's `netkv engine` instances (the
# k-th instance: HTTP on 9000+k, KV side channel on 9100+k announced as RACK_ADDR).
set -eu
: "${HOST:?}" "${RACK_ADDR:?}" "${SPINE:?}"
NIC_RATE=${NIC_RATE:-40mbit}
IF=$(ip -o -4 addr show | awk -v a="$RACK_ADDR" 'index($4, a "/") == 1 {print $2}')
[ -n "$IF" ] || { echo "no interface with $RACK_ADDR" >&2; exit 1; }
tc qdisc replace dev "$IF" root tbf rate "$NIC_RATE" burst 16kb limit 256kb
ip route replace 198.18.8.0/21 via "$SPINE" dev "$IF"
SPEED=$(python3 -c "import sys; r=sys.argv[1].lower(); print(float(r.rstrip('mbit'))/1000)" "$NIC_RATE")
cat > /tmp/agent.yaml <<YAML
redis: {url: "redis://redis:6379/0"}
mqtt: {host: mosquitto, port: 1883}
topology: /etc/netkv/topology.yaml
agent: {agent_id: $HOST, listen_address: $RACK_ADDR, fabric_nic: $IF, rdma_enabled: false,
        nic_speed_gbps: {$IF: $SPEED}, counter_interval_s: 0.5, publish_interval_s: 0.5}
YAML
netkv agent --config /tmp/agent.yaml &
exec netkv testbed engine --host "$HOST" --topology /etc/netkv/topology.yaml
