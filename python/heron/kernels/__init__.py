"""The kernel API: heron's ops, each defined once, and what users call over them.

- stream: the perturbation contract, (seed, offset) -> N(0, 1), and the parameter layout
- ops: the torch.library definition of every op (schema, fake impl) and its dispatch
- launchers: the {op: {backend: launcher}} table
- backends: which backends run here, and the choice of one for a device
- reference: the plain-PyTorch truth of every op (materialises the direction)
- functional: the public functions (validate input, then call the op)
- nn: modules over the dual-stream ops (PerturbedLinear, LoRALinear)
- flops: FLOP formulas of the ops for torch.utils.flop_counter
"""
