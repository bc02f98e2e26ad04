#!/bin/sh
# The spine router between the racks: forwards between its rack interfaces and shapes each
# (egress towards a rack = that rack's downlink) with tbf.
set -eu
RATE=${UPLINK_RATE:-80mbit}
for addr in $SPINE_ADDRS; do
  IF=$(ip -o -4 addr show | awk -v a="$addr" 'index($4, a "/") == 1 {print $2}')
  tc qdisc replace dev "$IF" root tbf rate "$RATE" burst 32kb limit 512kb
  echo "spine: $IF ($addr) shaped to $RATE"
done
touch /tmp/ready
exec sleep infinity
