"""The Kubernetes operator: Campaigns and Trials reconciled by kopf handlers."""
