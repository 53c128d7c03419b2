"""Everything serving needs except the network: registry, predictors, deployments, routing, batching."""
