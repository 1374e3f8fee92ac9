#!/bin/sh
# Enroll every running agent's key with the collector: reads each agent pod's public key
# (`gputally agent --print-public-key`, which creates the key on first use) and updates the
# gputally-agent-keys ConfigMap, one <node>.pub per node. The collector picks changes up
# without a restart.
#
# It follows the rules of `gputally enroll`: a new node is enrolled; a node whose key changed
# (a reinstalled node, or someone else's key) is left as it was and reported, until you run
# the script again with `--rotate NODE`, which makes the new key current and keeps the old
# one (on its line above), so that what the old key signed can still be verified. A key that
# was retired by a rotation is never made current again. Nodes whose agents are gone keep
# their keys: their past is still evidence.
#
# With --collect DIR it also writes, for the auditor's enrolment records (docs/enrolment.md),
# each node's inventory (DIR/<node>.json, `gputally agent --once --json`) and the key its
# agent presents (DIR/<node>.pub): what `gputally enrolment sign` reads.
#   sh deploy/kubernetes/enroll.sh [--namespace NS] [--rotate NODE]... [--collect DIR]
set -eu
namespace=gputally
rotate=" "
collect=
while [ $# -gt 0 ]; do
    case $1 in
    --namespace) namespace=$2; shift 2 ;;
    --rotate) rotate="$rotate$2 "; shift 2 ;;
    --collect) collect=$2; mkdir -p "$collect"; shift 2 ;;
    -h | --help) sed -n '2,17p' "$0" | cut -c3-; exit 0 ;;
    *) echo "enroll.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
dir=$(mktemp -d)
trap 'rm -rf "$dir" "$dir.yaml"' EXIT
mkdir "$dir/keys"

# The keys enrolled so far, history included (an absent ConfigMap is a first enrollment).
if kubectl -n "$namespace" get configmap gputally-agent-keys >/dev/null 2>&1; then
    kubectl -n "$namespace" get configmap gputally-agent-keys \
        -o go-template --template '{{range $name, $text := .data}}{{$name}}{{"\n"}}{{end}}' |
    while read -r name; do
        kubectl -n "$namespace" get configmap gputally-agent-keys \
            -o go-template --template "{{index .data \"$name\"}}" > "$dir/keys/$name"
    done
fi

kubectl -n "$namespace" get pods -l app.kubernetes.io/component=agent \
    -o go-template --template '{{range .items}}{{.metadata.name}} {{.spec.nodeName}}{{"\n"}}{{end}}' \
    > "$dir/pods"
refused=0
while read -r pod node; do
    key=$(kubectl -n "$namespace" exec "$pod" -- gputally agent --config /etc/gputally/agent.toml \
        --node "$node" --print-public-key </dev/null)
    if [ -n "$collect" ]; then
        echo "$key" > "$collect/$node.pub"
        kubectl -n "$namespace" exec "$pod" -- gputally agent --config /etc/gputally/agent.toml \
            --node "$node" --once --json </dev/null > "$collect/$node.json"
    fi
    file="$dir/keys/$node.pub"
    current=$(grep . "$file" 2>/dev/null | tail -n 1 || true)
    if [ -z "$current" ]; then
        echo "$key" > "$file"
        echo "$node: enrolled (from $pod)" >&2
    elif [ "$key" = "$current" ]; then
        echo "$node: enrolled already" >&2
    elif grep -qxF "$key" "$file"; then
        echo "$node: REFUSED: its agent presents a key retired by a rotation" >&2
        refused=$((refused + 1))
    elif case $rotate in *" $node "*) true ;; *) false ;; esac; then
        echo "$key" >> "$file"
        echo "$node: key rotated (the old key stays, to verify what it signed)" >&2
    else
        echo "$node: REFUSED: its agent presents another key than the enrolled one;" \
            "if the node was reinstalled, run again with --rotate $node" >&2
        refused=$((refused + 1))
    fi
done < "$dir/pods"

kubectl -n "$namespace" create configmap gputally-agent-keys --from-file="$dir/keys" \
    --dry-run=client -o yaml > "$dir.yaml"
kubectl diff -f "$dir.yaml" || true # what changes: new nodes, and rotated keys
kubectl apply -f "$dir.yaml"
echo "enrolled: $(ls "$dir/keys" | grep -c '\.pub$') nodes; refused: $refused" >&2
[ "$refused" -eq 0 ]
