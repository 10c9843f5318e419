"""Adapters of a frozen linear layer (Part 2, fine-tuning): LoRA, DoRA and (IA)$^3$, written to equal ``peft``'s.

- :class:`LoRALinear`: a frozen ``nn.Linear`` plus a trainable low-rank update $\\frac{\\alpha}{r} BA$.
- :class:`DoRALinear`: LoRA on the direction of each output row, with a trainable magnitude.
- :class:`IA3Linear`: (IA)$^3$, a learned rescaling of the frozen layer's output (or input).
- :func:`apply_lora`, :func:`merge_lora`, :func:`unload_lora`, :func:`lora_layers`: whole models,
  with ``peft``'s ``target_modules`` semantics (a layer is targeted when its name ends with a target).
- :func:`lora_parameter_count` and :func:`trainable_parameter_report`: what LoRA trains, and how little.
- :func:`save_adapter` / :func:`load_adapter` / :func:`set_adapter_weights`: adapters as small files,
  refused by a base model they do not fit, and swapped on one base (one model, many adapters).
- :func:`copy_lora_to_peft`: our adapter weights into a ``peft`` model, so the two can be compared.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.checks import check_positive_int
from utils.measure import count_parameters

__all__ = [
    "ADAPTER_FORMAT",
    "CONFIG_FILE",
    "CONFIG_KEYS",
    "WEIGHTS_FILE",
    "DoRALinear",
    "IA3Linear",
    "LoRALinear",
    "apply_lora",
    "copy_lora_to_peft",
    "load_adapter",
    "lora_layers",
    "lora_parameter_count",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
    "set_adapter_weights",
    "trainable_parameter_report",
    "unload_lora",
]

ADAPTER_FORMAT = "llms-executed-lora/1"
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")  # the parts of model.config an adapter depends on


def _check_hyperparameters(rank: int, alpha: float, dropout: float, in_features: int,
                           out_features: int) -> None:
    limit = min(in_features, out_features)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
        raise ValueError(f"rank {rank!r} is invalid: it must be an int in [1, min(in, out)] = [1, {limit}] "
                         f"for a {in_features} -> {out_features} layer (a larger rank adds nothing)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0 (the update is scaled by alpha / rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update: $y = W x + b + \\frac{\\alpha}{r} B A\\,\\mathrm{dropout}(x)$.

    $A$ (rank x in) starts like ``peft``'s: Kaiming-uniform with $a = \\sqrt 5$, i.e. uniform in
    $\\pm 1/\\sqrt{d_{in}}$; $B$ (out x rank) starts at zero, so the wrapped layer first computes exactly
    what the base did. Only $A$ and $B$ are trainable: $r(d_{in} + d_{out})$ numbers instead of
    $d_{in} d_{out}$. The scaling $s = \\alpha / r$ is ``peft``'s default (not rsLoRA's $\\alpha/\\sqrt r$).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__} "
                            "(to change an adapter, call merge_lora or unload_lora first)")
        _check_hyperparameters(rank, alpha, dropout, base.in_features, base.out_features)
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # as peft does
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def dropout_p(self) -> float:
        return getattr(self.dropout, "p", 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """$s B A$, the (out x in) update this layer adds to $W$."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """The single matrix this layer computes with (without dropout): $W + s B A$."""
        return self.base.weight + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight and the base's bias, frozen like the base."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        merged.weight.copy_(self.merged_weight())
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged.requires_grad_(False).train(self.training)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_p}"


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA: $W' = m \\odot \\frac{W + sBA}{\\lVert W + sBA \\rVert_c}$.

    $\\lVert \\cdot \\rVert_c$ is ``peft``'s "column-wise" norm: with ``nn.Linear``'s (out x in) weight
    it is the L2 norm of each output row, $n_i = \\lVert (W + sBA)_{i,:} \\rVert_2$ (the paper stores
    $W$ transposed, hence "column"). The trainable magnitude $m$ (out) starts at the row norms of $W$,
    so again the layer first computes what the base did. As in ``peft`` (and section 4.3 of the paper)
    $n$ is detached in the forward pass: the same value, but no gradient flows through the norm.
    The forward pass is ``peft``'s, dropout included: with $\\tilde x = \\mathrm{dropout}(x)$,
    $y = W x + b + (\\frac{m}{n} - 1) \\odot W \\tilde x + \\frac{m}{n} \\odot s B A \\tilde x$, which
    without dropout is $W' x + b$.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.magnitude = nn.Parameter(self.weight_norm().detach().clone())

    def weight_norm(self) -> torch.Tensor:
        """$n = \\lVert W + sBA \\rVert_c$, one L2 norm per output row (out,)."""
        return torch.linalg.norm(self.base.weight + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_tilde = self.dropout(x)
        scale = self.magnitude / self.weight_norm().detach()  # m / n, (out,)
        lora = F.linear(F.linear(x_tilde, self.lora_A), self.lora_B)
        return self.base(x) + (scale - 1) * F.linear(x_tilde, self.base.weight) + scale * lora * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """$m \\odot (W + sBA) / \\lVert W + sBA \\rVert_c$."""
        return (self.magnitude / self.weight_norm())[:, None] * (self.base.weight + self.delta_weight())


class IA3Linear(nn.Module):
    """(IA)$^3$: a frozen linear layer whose output (or, for ``feedforward``, input) is rescaled.

    ``feedforward=False``: $y = l \\odot (W x + b)$ with $l \\in \\mathbb{R}^{d_{out}}$;
    ``feedforward=True``: $y = W (l \\odot x) + b$ with $l \\in \\mathbb{R}^{d_{in}}$, as ``peft`` does
    for ``feedforward_modules``. $l$ starts at ones, so the layer first computes what the base did.
    """

    def __init__(self, base: nn.Linear, feedforward: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IA3Linear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.feedforward = feedforward
        size = base.in_features if feedforward else base.out_features
        self.scale = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base(x * self.scale)
        return self.base(x) * self.scale


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA (and DoRA) layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer by qualified name; a LoRA layer stands for the base ``nn.Linear`` it wraps."""
    wrapped = lora_layers(model)
    layers = {name: m.base for name, m in wrapped.items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[0] not in wrapped:
            layers[name] = module
    return layers


def _is_target(name: str, target: str) -> bool:
    """``peft``'s rule: the name is the target or ends with "." + target."""
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float, dropout: float = 0.0,
               use_dora: bool = False) -> list[str]:
    """Wrap every ``nn.Linear`` whose name ends with a target (e.g. ``["q_proj", "v_proj"]``) in place.

    All other parameters are frozen; only $A$, $B$ (and DoRA's $m$) train. Everything is checked before
    the model is touched. Returns the qualified names of the wrapped layers.
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of names, e.g. ['q_proj'], got {target_modules!r}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers: call merge_lora or unload_lora first "
                         "(load_adapter swaps adapters by itself)")
    linears = _linear_layers(model)
    unknown = [t for t in target_modules if not any(_is_target(name, t) for name in linears)]
    if unknown:
        suffixes = sorted({name.rpartition(".")[2] for name in linears})
        raise ValueError(f"no linear layer matches target(s) {unknown}; the linear layers of this model "
                         f"end with: {suffixes}")
    chosen = {name: m for name, m in linears.items() if any(_is_target(name, t) for t in target_modules)}
    for name, linear in chosen.items():
        try:
            _check_hyperparameters(rank, alpha, dropout, linear.in_features, linear.out_features)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    model.requires_grad_(False)
    layer_class = DoRALinear if use_dora else LoRALinear
    for name, linear in chosen.items():
        model.set_submodule(name, layer_class(linear, rank, alpha, dropout).train(linear.training))
    return list(chosen)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRA layer by the plain ``nn.Linear`` it computes (in place; returns ``model``)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge: call apply_lora or load_adapter first")
    for name, layer in layers.items():
        model.set_submodule(name, layer.merge())
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Put each LoRA layer's untouched base ``nn.Linear`` back, discarding the adapter (in place)."""
    for name, layer in lora_layers(model).items():
        model.set_submodule(name, layer.base)
    return model


def lora_parameter_count(d_in: int, d_out: int, rank: int, use_dora: bool = False) -> int:
    """Trainable numbers of one LoRA layer: $r (d_{in} + d_{out})$, plus $d_{out}$ magnitudes for DoRA."""
    for name, value in (("d_in", d_in), ("d_out", d_out), ("rank", rank)):
        check_positive_int(name, value)
    return rank * (d_in + d_out) + (d_out if use_dora else 0)


def trainable_parameter_report(model: nn.Module) -> dict[str, int | float]:
    """``{"trainable", "total", "fraction"}``: parameters that will train, all of them (shared ones once)."""
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    return {"trainable": trainable, "total": total, "fraction": trainable / total if total else 0.0}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: ``{layer}.lora_A``, ``{layer}.lora_B`` (and ``{layer}.magnitude`` for DoRA)."""
    return {f"{name}.{key}": p.detach() for name, layer in lora_layers(model).items()
            for key, p in layer.named_parameters(recurse=False)}


@torch.no_grad()
def set_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (as :func:`lora_state_dict` names them) into the model's LoRA layers."""
    current = lora_state_dict(model)
    missing, unexpected = sorted(current.keys() - tensors.keys()), sorted(tensors.keys() - current.keys())
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not fit the model's LoRA layers: missing {missing}, "
                         f"unexpected {unexpected}")
    for key, value in tensors.items():
        if value.shape != current[key].shape:
            raise ValueError(f"{key}: adapter tensor has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(current[key].shape)}")
        current[key].copy_(value)


def _base_fingerprint(model: nn.Module, layer_names: list[str]) -> dict:
    """What an adapter depends on: the model class, key config numbers, and the wrapped layers' shapes."""
    config = getattr(model, "config", None)
    linears = _linear_layers(model)
    return {
        "model_class": type(model).__name__,
        "config": {key: getattr(config, key) for key in CONFIG_KEYS if hasattr(config, key)},
        "layers": {name: [linears[name].out_features, linears[name].in_features]
                   for name in layer_names if name in linears},
    }


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter of ``model`` to the folder ``path``: its tensors and a small JSON description.

    ``adapter.safetensors`` holds only the LoRA tensors (kilobytes to megabytes, not the base model);
    ``adapter.json`` holds rank, alpha, dropout, DoRA or not, the targets and a fingerprint of the base.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save: call apply_lora first")
    settings = {(m.rank, m.alpha, m.dropout_p, isinstance(m, DoRALinear)) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"save_adapter needs one rank/alpha/dropout/DoRA setting for all layers, found {settings}")
    rank, alpha, dropout, use_dora = settings.pop()
    fingerprint = _base_fingerprint(model, list(layers))
    meta = {
        "format": ADAPTER_FORMAT, "rank": rank, "alpha": alpha, "dropout": dropout, "use_dora": use_dora,
        "target_modules": sorted({name.rpartition(".")[2] for name in layers}),
        "base": fingerprint,
        "fingerprint": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16],
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}, path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Apply the adapter saved in ``path`` to ``model`` (in place); returns the wrapped layers' names.

    Refuses, saying what differs, a base model that does not fit the adapter (model class, config
    numbers, layer names or shapes). An adapter already on the model is unloaded first, so calling this
    again with another adapter swaps adapters on one base.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not an adapter written by utils.lora.save_adapter")
    saved = meta["base"]
    here = _base_fingerprint(model, list(saved["layers"]))
    problems = [f"{key}: adapter {saved[key]!r}, model {here[key]!r}"
                for key in ("model_class", "config") if saved[key] != here[key]]
    missing = sorted(saved["layers"].keys() - here["layers"].keys())
    if missing:
        problems.append(f"layers the adapter needs but the model lacks: {missing}")
    problems += [f"layer {name}: adapter (out, in) = {shape}, model {here['layers'][name]}"
                 for name, shape in saved["layers"].items() if name in here["layers"]
                 and here["layers"][name] != shape]
    if problems:
        raise ValueError(f"adapter {path} (base fingerprint {meta['fingerprint']}) does not fit this model: "
                         + "; ".join(problems))
    unload_lora(model)
    names = apply_lora(model, list(saved["layers"]), meta["rank"], meta["alpha"], meta["dropout"],
                       meta["use_dora"])
    set_adapter_weights(model, load_file(path / WEIGHTS_FILE))
    return names


@torch.no_grad()
def copy_lora_to_peft(model: nn.Module, peft_model: nn.Module, adapter_name: str = "default") -> None:
    """Copy our $A$, $B$ (and DoRA's $m$) into a ``peft`` model built on a copy of the same base.

    The ``peft`` model must have LoRA on exactly our layers, with the same rank, scaling and DoRA setting.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    theirs = {name: m for name, m in base.named_modules()
              if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    ours = lora_layers(model)
    if theirs.keys() != ours.keys():
        raise ValueError(f"the peft model has LoRA adapter {adapter_name!r} on {sorted(theirs)}, "
                         f"ours on {sorted(ours)}: build it with the same target_modules")
    for name, layer in ours.items():
        peft_layer = theirs[name]
        use_dora = bool(peft_layer.use_dora.get(adapter_name, False))
        same = (peft_layer.r[adapter_name] == layer.rank and peft_layer.scaling[adapter_name] == layer.scaling
                and use_dora == isinstance(layer, DoRALinear))
        if not same:
            raise ValueError(f"{name}: peft has r={peft_layer.r[adapter_name]}, scaling="
                             f"{peft_layer.scaling[adapter_name]}, use_dora={use_dora}; ours rank={layer.rank}, "
                             f"scaling={layer.scaling}, DoRA={isinstance(layer, DoRALinear)}")
        peft_layer.lora_A[adapter_name].weight.copy_(layer.lora_A)
        peft_layer.lora_B[adapter_name].weight.copy_(layer.lora_B)
        if use_dora:
            peft_layer.lora_magnitude_vector[adapter_name].weight.copy_(layer.magnitude)
