"""Beyond one machine: the cluster's CA, model replicas placed on Ray nodes, and their
channels to the gateway over mutual TLS (docs/scaling.md)."""
