#!/usr/bin/env bash
# skylab on a throwaway kind cluster: build both images, helm install the chart, run a
# CPU-sized campaign to 3 trials, show them, tear the cluster down.
# Needs docker, kind, kubectl and helm. KEEP_CLUSTER=1 leaves the cluster up.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-skylab-e2e}
NAMESPACE=skylab
CAMPAIGN=gpt-cpu
TRIALS=3
TIMEOUT_SECONDS=${E2E_TIMEOUT_SECONDS:-2400}

for tool in docker kind kubectl helm; do
  command -v "$tool" > /dev/null || { echo "kind-e2e: $tool is not installed" >&2; exit 2; }
done

teardown() {
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "kind-e2e: cluster $CLUSTER kept (kind delete cluster --name $CLUSTER)"
  else
    kind delete cluster --name "$CLUSTER"
  fi
}

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
trap teardown EXIT
kubectl config use-context "kind-$CLUSTER"

docker build -f Dockerfile.operator -t skylab-operator:e2e .
docker build -f Dockerfile.trainer -t skylab-trainer:e2e .
kind load docker-image --name "$CLUSTER" skylab-operator:e2e skylab-trainer:e2e

helm upgrade --install skylab charts/skylab --namespace "$NAMESPACE" --create-namespace \
  --values examples/values/kind.yaml --wait --timeout 10m
kubectl -n "$NAMESPACE" wait --for=condition=complete job \
  -l app.kubernetes.io/component=data --timeout=30m

sed "s|ghcr.io/skylab-dev/skylab-trainer:0.1.0|skylab-trainer:e2e|" examples/campaign-cpu.yaml \
  | kubectl -n "$NAMESPACE" apply -f -

# Done when TRIALS trials carry a keep/revert decision, or the campaign ended.
deadline=$((SECONDS + TIMEOUT_SECONDS))
while :; do
  decided=$(kubectl -n "$NAMESPACE" get trials -l "skylab.dev/campaign=$CAMPAIGN" \
    -o jsonpath='{range .items[*]}{.status.decision}{"\n"}{end}' | grep -c . || true)
  phase=$(kubectl -n "$NAMESPACE" get campaign "$CAMPAIGN" -o jsonpath='{.status.phase}')
  echo "kind-e2e: $decided of $TRIALS trials decided, campaign ${phase:-Pending}"
  [ "$decided" -ge "$TRIALS" ] && break
  if [ "$phase" = Failed ] || [ "$SECONDS" -ge "$deadline" ]; then
    kubectl -n "$NAMESPACE" get campaigns,trials,jobs,pods -o wide
    kubectl -n "$NAMESPACE" logs deployment/skylab --tail=100
    echo "kind-e2e: FAILED: $decided of $TRIALS trials decided" >&2
    exit 1
  fi
  sleep 15
done

kubectl -n "$NAMESPACE" get campaigns,trials
echo "kind-e2e: passed"
