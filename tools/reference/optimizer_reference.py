#!/usr/bin/env python3
"""Reference trajectories for the LoRA optimisers (crates/flux2-tuner/tests/optimizers.rs).

Runs the real Python optimisers (torch.optim.AdamW, bitsandbytes AdamW8bit and Lion on the CPU,
transformers Adafactor, prodigyopt Prodigy, lion_pytorch Lion), built from `--optimizer_args`
strings the way Musubi's `trainer_base.get_optimizer` builds them, on a small problem: three
parameters (a 8x520 matrix that bitsandbytes keeps in 8 bits, a zero 6x5 matrix like a LoRA
`up`, a 7-vector), gradient `w * (p - target)` (f32), five steps at learning rates
`lr * (1, 0.9, 0.8, 0.7, 0.6)`. Writes fixtures/optimizers/problem.safetensors (initial values,
targets, weights, bitsandbytes' quantisation maps), one <case>.safetensors per case (parameters
after steps 1 and 5; AdamW8bit's 8-bit states after step 5) and cases.json (the options, the
`ss_optimizer` string Musubi would write, and per-step logged values).

Run: /work/venv-ref/bin/python tools/reference/optimizer_reference.py
(needs torch, transformers, bitsandbytes, prodigyopt, lion-pytorch)
"""

import ast
import importlib
import json
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "optimizers")
STEPS = 5
NAMES = ["a", "b", "c"]

CASES = [
    # name, optimizer_type, optimizer_args, learning_rate, group factors (LoRA+) per parameter
    ("adamw", "AdamW", [], 1e-2, [1, 1, 1]),
    ("adamw_options", "AdamW", ["betas=(0.8,0.99)", "weight_decay=0.1", "eps=1e-6", "amsgrad=True"], 1e-2, [1, 1, 1]),
    ("adamw_loraplus", "adamw", [], 1e-2, [1, 4, 4]),
    ("adamw8bit", "AdamW8bit", [], 1e-2, [1, 1, 1]),
    ("adamw8bit_options", "bitsandbytes.optim.AdamW8bit", ["weight_decay=0.05", "betas=(0.85,0.995)"], 3e-2, [1, 1, 1]),
    ("adafactor", "Adafactor", [], 1e-4, [1, 1, 1]),
    ("adafactor_warmup_init", "adafactor", ["warmup_init=True", "relative_step=False"], 1e-4, [1, 1, 1]),
    (
        "adafactor_fixed_lr",
        "Adafactor",
        ["relative_step=False", "scale_parameter=False", "beta1=0.9", "weight_decay=0.01", "clip_threshold=0.5", "decay_rate=-0.5", "eps=(1e-30,1e-3)"],
        1e-2,
        [1, 1, 1],
    ),
    ("prodigy", "prodigyopt.Prodigy", [], 1.0, [1, 1, 1]),
    (
        "prodigy_options",
        "prodigyopt.Prodigy",
        ["betas=(0.9,0.99)", "use_bias_correction=True", "safeguard_warmup=True", "weight_decay=0.01", "d_coef=2", "growth_rate=1.5", "d0=1e-4"],
        1.0,
        [1, 1, 1],
    ),
    ("prodigy_coupled_decay", "prodigyopt.Prodigy", ["weight_decay=0.1", "decouple=False", "beta3=0.9"], 1.0, [1, 1, 1]),
    ("lion", "lion_pytorch.Lion", [], 1e-3, [1, 1, 1]),
    ("lion_decoupled", "lion_pytorch.Lion", ["weight_decay=0.1", "betas=(0.95,0.98)", "decoupled_weight_decay=True"], 1e-3, [1, 1, 1]),
    ("lion_bitsandbytes", "bitsandbytes.optim.Lion", ["weight_decay=0.01"], 1e-3, [1, 1, 1]),
]


def musubi_optimizer(optimizer_type, optimizer_args, lr, groups):
    """trainer_base.get_optimizer, reduced to the optimisers covered here."""
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    lower = optimizer_type.lower()
    optimizer_class = None
    if lower == "adamw8bit":
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    elif lower == "adafactor":
        import transformers

        if "relative_step" not in kwargs:
            kwargs["relative_step"] = True
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            lr = None
        optimizer_class = transformers.optimization.Adafactor
    elif lower == "adamw":
        optimizer_class = torch.optim.AdamW
    else:
        module, name = optimizer_type.rsplit(".", 1)
        optimizer_class = getattr(importlib.import_module(module), name)
    optimizer = optimizer_class(groups, lr=lr, **kwargs)
    name = optimizer_class.__module__ + "." + optimizer_class.__name__
    arguments = ",".join([f"{k}={v}" for k, v in kwargs.items()])
    description = name + (f"({arguments})" if len(arguments) > 0 else "")
    return optimizer, description, lr is None and lower == "adafactor"


def use_the_pure_pytorch_8bit_kernel():
    """bitsandbytes has three 8-bit block-wise kernels: CUDA (an approximate nearest-entry
    search), its native CPU library (an approximate BinSearch lookup that can land several codes
    away) and the pure-PyTorch reference in its Triton backend (exact nearest entry by argmin).
    The Rust port follows the last one, so the references route AdamW8bit through it."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.triton.kernels_optim import optimizer_update_8bit_blockwise_pytorch

    def update(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr,
               qmap1, qmap2, absmax1, absmax2, weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False):
        optimizer_update_8bit_blockwise_pytorch(
            p, g, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2,
            absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros, optimizer_name=optimizer_name)

    F.optimizer_update_8bit_blockwise = update


def main():
    os.makedirs(OUT, exist_ok=True)
    use_the_pure_pytorch_8bit_kernel()
    generator = torch.Generator().manual_seed(20261127)
    shapes = {"a": (8, 520), "b": (6, 5), "c": (7,)}
    init = {
        "a": torch.randn(shapes["a"], generator=generator) * 0.1,
        "b": torch.zeros(shapes["b"]),
        "c": torch.randn(shapes["c"], generator=generator) * 0.5,
    }
    target = {n: torch.randn(shapes[n], generator=generator) * 0.2 for n in NAMES}
    weight = {n: 0.5 + torch.rand(shapes[n], generator=generator) for n in NAMES}
    import bitsandbytes.functional as F

    problem = {}
    for n in NAMES:
        problem[f"init.{n}"] = init[n]
        problem[f"target.{n}"] = target[n]
        problem[f"weight.{n}"] = weight[n]
    problem["qmap.signed"] = F.create_dynamic_map(signed=True)
    problem["qmap.unsigned"] = F.create_dynamic_map(signed=False)
    save_file({k: v.contiguous() for k, v in problem.items()}, os.path.join(OUT, "problem.safetensors"))

    summary = []
    for name, optimizer_type, optimizer_args, learning_rate, factors in CASES:
        params = [torch.nn.Parameter(init[n].clone()) for n in NAMES]
        groups = []
        for factor in sorted(set(factors)):
            groups.append({"params": [p for p, f in zip(params, factors) if f == factor], "lr": learning_rate * factor, "factor": factor})
        optimizer, description, own_lr = musubi_optimizer(optimizer_type, optimizer_args, learning_rate, groups)
        if own_lr:
            for group in optimizer.param_groups:
                group["lr"] = None
        tensors = {}
        logged = []
        scheduled = []
        for step in range(STEPS):
            rate = learning_rate * (1.0 - 0.1 * step)
            scheduled.append(rate)
            for group in optimizer.param_groups:
                if not own_lr:
                    group["lr"] = rate * group["factor"]
            for p, n in zip(params, NAMES):
                p.grad = (p.detach() - target[n]) * weight[n]
            optimizer.step()
            if own_lr:
                # AdafactorSchedule.get_lr: the rate of the first parameter of the group.
                logged.append(float(optimizer._get_lr(optimizer.param_groups[0], optimizer.state[params[0]])))
            elif "prodigy" in optimizer_type.lower():
                logged.append(float(optimizer.param_groups[0]["d"]))
            if step in (0, STEPS - 1):
                for p, n in zip(params, NAMES):
                    tensors[f"step{step + 1}.{n}"] = p.detach().clone()
        if "8bit" in optimizer_type.lower():
            state = optimizer.state[params[0]]
            for key in ("state1", "absmax1", "state2", "absmax2"):
                tensors[f"{key}.a"] = state[key].clone()
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{name}.safetensors"))
        summary.append(
            {
                "name": name,
                "optimizer_type": optimizer_type,
                "optimizer_args": optimizer_args,
                "learning_rate": learning_rate,
                "factors": factors,
                "learning_rates": scheduled,
                "ss_optimizer": description,
                "own_learning_rates": logged if own_lr else None,
                "prodigy_d": logged if "prodigy" in optimizer_type.lower() else None,
            }
        )
        print(name, description)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"steps": STEPS, "parameters": NAMES, "cases": summary}, f, indent=1)


if __name__ == "__main__":
    main()
