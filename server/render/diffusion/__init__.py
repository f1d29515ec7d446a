"""GPU backend: diffusers pipelines with the identity LoRA and ControlNets, on the operator's weights."""
