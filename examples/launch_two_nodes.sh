#!/usr/bin/env bash
# One EcoServe cluster over two machines: run this script on each, with the same MASTER_ADDR.
#
#   machine A (10.0.0.1):  NODE_RANK=0 MASTER_ADDR=10.0.0.1 IFACE=eth0 ./examples/launch_two_nodes.sh
#   machine B:             NODE_RANK=1 MASTER_ADDR=10.0.0.1 IFACE=eth0 ./examples/launch_two_nodes.sh
#
# Node 0 hosts the rendezvous (torch TCPStore on MASTER_PORT), the coordinator and the prefill
# worker; node 1 runs the decode worker. The prompts' KV goes from A to B over IFACE. Clients
# connect to node 0 (CLIENT_HOST:CLIENT_PORT; 127.0.0.1 by default, so only from machine A).
# Both machines need the same EcoServe checkout set up (`make setup`) and the same model.
set -euo pipefail
cd "$(dirname "$0")/.."

NODE_RANK=${NODE_RANK:?set NODE_RANK to 0 on the first machine and 1 on the second}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to machine A\'s address on the cluster network}
MASTER_PORT=${MASTER_PORT:-29400}
IFACE=${IFACE:-}
MODEL=${MODEL:-smollm2-135m}
POLICY=${POLICY:-distserve}
CLIENT_HOST=${CLIENT_HOST:-127.0.0.1}
CLIENT_PORT=${CLIENT_PORT:-5555}

if [ "$NODE_RANK" = 0 ]; then role=(--prefill 1); else role=(--decode 1); fi
iface=(); if [ -n "$IFACE" ]; then iface=(--iface "$IFACE"); fi

exec .venv/bin/ecoserve launch --model "$MODEL" --policy "$POLICY" \
    --nnodes 2 --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "${iface[@]}" "${role[@]}" --host "$CLIENT_HOST" --port "$CLIENT_PORT"
