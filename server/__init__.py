"""Central services: the Flower coordinator and the on-prem render node."""
