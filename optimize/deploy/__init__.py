"""`optimize deploy render` and `optimize canary analyze`: the production rollout of a registered version
(Kubernetes + Istio canary, autoscaling, alerts, Argo Rollouts analysis, a Triton model repository), derived from
the recipe's `serving:` and `rollout:` sections and the version's measured load test, and checked with the tools
those systems use themselves."""
