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

# A cluster this script did not create is never deleted.
created=0
teardown() {
  if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER"
  else
    echo "kind-e2e: cluster $CLUSTER kept (kind delete cluster --name $CLUSTER)"
  fi
}
trap teardown EXIT

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
  created=1
fi
kubectl config use-context "kind-$CLUSTER"

# What `kubectl get ARGS` prints; nothing when the API server does not answer.
field() {
  kubectl -n "$NAMESPACE" get "$@" 2> /dev/null || true
}

docker build -f Dockerfile.operator -t skylab-operator:e2e .
docker build -f Dockerfile.trainer -t skylab-trainer:e2e .
kind load docker-image --name "$CLUSTER" skylab-operator:e2e skylab-trainer:e2e

helm upgrade --install skylab charts/skylab --namespace "$NAMESPACE" --create-namespace \
  --values examples/values/kind.yaml --wait --timeout 10m
# The data Job: done, or failed for good (its pods' logs say why).
deadline=$((SECONDS + 1800))
while :; do
  done=$(field jobs -l app.kubernetes.io/component=data -o jsonpath='{.items[0].status.succeeded}')
  failed=$(field jobs -l app.kubernetes.io/component=data \
    -o jsonpath='{.items[0].status.conditions[?(@.type=="Failed")].status}')
  [ "$done" = 1 ] && break
  if [ "$failed" = True ] || [ "$SECONDS" -ge "$deadline" ]; then
    kubectl -n "$NAMESPACE" logs -l app.kubernetes.io/component=data --tail=50 || true
    echo "kind-e2e: FAILED: the data-preparation Job did not complete" >&2
    exit 1
  fi
  sleep 10
done

sed "s|ghcr.io/skylab-dev/skylab-trainer:0.1.0|skylab-trainer:e2e|" examples/campaign-cpu.yaml \
  | kubectl -n "$NAMESPACE" apply -f -

# Done when TRIALS trials carry a keep/revert decision; failed when the campaign ends short.
deadline=$((SECONDS + TIMEOUT_SECONDS))
while :; do
  decided=$(field trials -l "skylab.dev/campaign=$CAMPAIGN" \
    -o jsonpath='{range .items[*]}{.status.decision}{"\n"}{end}' | grep -c . || true)
  phase=$(field campaign "$CAMPAIGN" -o jsonpath='{.status.phase}')
  echo "kind-e2e: $decided of $TRIALS trials decided, campaign ${phase:-Pending}"
  [ "$decided" -ge "$TRIALS" ] && break
  if [ "$phase" = Failed ] || [ "$phase" = Succeeded ] || [ "$SECONDS" -ge "$deadline" ]; then
    kubectl -n "$NAMESPACE" get campaigns,trials,jobs,pods -o wide
    kubectl -n "$NAMESPACE" logs deployment/skylab --tail=100
    echo "kind-e2e: FAILED: $decided of $TRIALS trials decided" >&2
    exit 1
  fi
  sleep 15
done

kubectl -n "$NAMESPACE" get campaigns,trials
echo "kind-e2e: passed"
