#!/bin/sh
# Enroll every running agent's key with the collector: reads each agent pod's public key
# (`gputally agent --print-public-key`, which creates the key on first use) and writes the
# gputally-agent-keys ConfigMap, one <node>.pub per node. The collector picks changes up
# without a restart. Run it after adding nodes; it prints the change first: a node whose key
# changed (a reinstall, or someone else's key) deserves a look (a reinstalled node, or someone else's).
#   sh deploy/kubernetes/enroll.sh [namespace]
set -eu
namespace=${1:-gputally}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
kubectl -n "$namespace" get pods -l app.kubernetes.io/component=agent \
    -o go-template --template '{{range .items}}{{.metadata.name}} {{.spec.nodeName}}{{"\n"}}{{end}}' |
while read -r pod node; do
    kubectl -n "$namespace" exec "$pod" -- gputally agent --config /etc/gputally/agent.toml \
        --node "$node" --print-public-key > "$dir/$node.pub"
    echo "read the key of $node from $pod" >&2
done
kubectl -n "$namespace" create configmap gputally-agent-keys --from-file="$dir" \
    --dry-run=client -o yaml > "$dir.yaml"
kubectl diff -f "$dir.yaml" || true # what changes: new nodes, and any key that changed
kubectl apply -f "$dir.yaml"
rm -f "$dir.yaml"
echo "enrolled: $(ls "$dir" | grep -c '\.pub$') nodes" >&2
