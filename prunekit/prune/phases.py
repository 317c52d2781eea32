"""Phases: which consecutive layers are sparsified, thresholded and pruned together.

Presets follow the paper (section 4.1): SSD300 in four phases conv1_1-conv4_3, conv4_3-conv7,
conv7-conv8_2, conv8_2-conv11_2 (SSD512 adds conv12 to the last one), VGG16 in two (convs, then
the classifier). The paper's ranges share their boundary layers (conv4_3, conv7, conv8_2).
prunekit assigns a boundary layer to the FIRST phase, where it is pruned together with the
detection-head convs it feeds; the next phase starts after it. (It is pruned there because its
consumers' input slices - part of its removal statistics - shrink with it in the same surgery.)

A phase's layer set L (the L1 term and the global threshold) is its listed layers plus, with
``include_heads``, every non-prunable consumer of them: SSD's head convs (``*_mbox_loc`` /
``*_mbox_conf``) and the classifier's last layer. Only prunable producers lose filters.

User phases come from a YAML or JSON file::

    phases:
      - name: trunk
        layers: [conv1_1..conv4_3]          # ranges in forward order, or single names
      - name: rest
        layers: [conv5_1, conv5_2, conv5_3, conv6, conv7]
        include_heads: true                  # default

A layer listed in several phases is pruned in the first; later phases only regularise it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.prune.graph import DependencyGraph, build_dependency_graph, layer_names_of


@dataclass
class Phase:
    """One phase: a name and its layers (names or ``a..b`` ranges, resolved against a model)."""

    name: str
    layers: list[str]
    include_heads: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layers": list(self.layers), "include_heads": self.include_heads}


@dataclass
class ResolvedPhase:
    """A phase against one model: the L1/threshold set and the producers it may prune."""

    name: str
    l1_layers: list[str]
    prune_layers: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it is not pruned

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "l1_layers": self.l1_layers,
            "prune_layers": self.prune_layers,
            "skipped": self.skipped,
        }


_SSD300 = [
    ("p1", ["conv1_1..conv4_3"]),
    ("p2", ["conv5_1..conv7"]),
    ("p3", ["conv8_1..conv8_2"]),
    ("p4", ["conv9_1..conv11_2"]),
]
_SSD512 = _SSD300[:3] + [("p4", ["conv9_1..conv12_2"])]
_VGG16 = [("convs", ["conv1_1..conv5_3"]), ("fcs", ["fc6", "fc7"])]
PRESETS: dict[str, list[tuple[str, list[str]]]] = {
    "ssd300": _SSD300,
    "ssd512": _SSD512,
    "vgg16": _VGG16,
}
ALIASES = {"ssd300_vgg16": "ssd300", "ssd512_vgg16": "ssd512"}


def preset_phases(name: str) -> list[Phase]:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(
            f"unknown phase preset {name!r}; expected one of {sorted(PRESETS)} or a YAML/JSON file"
        )
    return [Phase(n, list(layers)) for n, layers in PRESETS[key]]


def load_phases(path: str | os.PathLike) -> list[Phase]:
    """Phases from a YAML/JSON file (``{"phases": [...]}`` or a bare list; see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: phase file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise different types
        raise ValueError(f"{path}: not valid YAML/JSON ({type(e).__name__}: {e})") from e
    items = data.get("phases") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of phases (under 'phases:')")
    phases = []
    for i, item in enumerate(items):
        if isinstance(item, list):
            item = {"layers": item}
        if not isinstance(item, dict) or not isinstance(item.get("layers"), list) or not item["layers"]:
            raise ValueError(f"{path}: phase {i + 1} needs a non-empty 'layers' list")
        unknown = set(item) - {"name", "layers", "include_heads"}
        if unknown:
            raise ValueError(f"{path}: phase {i + 1} has unknown keys {sorted(unknown)}")
        phases.append(
            Phase(
                str(item.get("name", f"p{i + 1}")),
                [str(x) for x in item["layers"]],
                bool(item.get("include_heads", True)),
            )
        )
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: phase names must be unique, got {names}")
    return phases


def resolve_phases(spec: str | os.PathLike | Sequence[Phase], model: nn.Module | None = None) -> list[Phase]:
    """A preset name (``ssd300``, ``ssd512_vgg16``, ``vgg16``...), a YAML/JSON file, or phases.

    With ``model`` the phases are checked against it (unknown layers raise ``ValueError``).
    """
    preset = False
    if isinstance(spec, str | os.PathLike):
        s = os.fspath(spec)
        key = ALIASES.get(s, s)
        preset = key in PRESETS
        phases = preset_phases(key) if preset else load_phases(s)
    else:
        phases = list(spec)
    if model is not None:
        graph = build_dependency_graph(model)
        for p in phases:
            expand_layers(p.layers, graph, allow_missing=preset)
    return phases


def expand_layers(items: Sequence[str], graph: DependencyGraph, allow_missing: bool = False) -> list[str]:
    """Names and ``a..b`` ranges -> layer names in forward order.

    ``allow_missing``: a range end that the model lacks (a pruned-Kdet SSD has no conv11_2) is
    clipped to the layers it has; used for presets only.
    """
    order = list(graph.names)
    out: list[str] = []
    for item in items:
        if ".." in item:
            a, b = item.split("..", 1)
            if a not in graph.names:
                if allow_missing:
                    continue
                raise ValueError(f"unknown layer {a!r} in phase range {item!r}")
            if b not in graph.names:
                if not allow_missing:
                    raise ValueError(f"unknown layer {b!r} in phase range {item!r}")
                j = len(order) - 1
                while j > order.index(a) and order[j].endswith(("_mbox_loc", "_mbox_conf")):
                    j -= 1
                b = order[j]
            i, j = order.index(a), order.index(b)
            if j < i:
                raise ValueError(f"phase range {item!r} runs backwards")
            span = [n for n in order[i : j + 1] if not n.endswith(("_mbox_loc", "_mbox_conf"))]
            out += [n for n in span if n not in out]
        elif item in graph.names:
            if item not in out:
                out.append(item)
        elif not allow_missing:
            raise ValueError(f"unknown layer {item!r} in phase (known: {', '.join(order[:6])}...)")
    return out


def resolve(phase: Phase, graph: DependencyGraph, already_pruned: set[str] | None = None) -> ResolvedPhase:
    """The phase's L1 set and prunable producers on the model ``graph`` was built from."""
    already = already_pruned or set()
    listed = expand_layers(phase.layers, graph, allow_missing=True)
    l1 = list(listed)
    prune: list[str] = []
    skipped: dict[str, str] = {}
    for name in listed:
        group = graph.group(name)
        if not group.prunable:
            skipped[name] = group.reason
        elif name in already:
            skipped[name] = "pruned in an earlier phase"
        else:
            prune.append(name)
        if phase.include_heads and group.prunable:
            for c in group.consumers:
                cname = graph.name_of(c.target)
                cgroup = graph.group(cname)
                if not cgroup.prunable and cname not in l1:
                    l1.append(cname)
    return ResolvedPhase(phase.name, l1, prune, skipped)


def phase_layers(model: nn.Module, phase: Phase) -> ResolvedPhase:
    """Convenience: :func:`resolve` on a freshly traced ``model``."""
    return resolve(phase, build_dependency_graph(model))


def known_layers(model: nn.Module) -> list[str]:
    return list(layer_names_of(model))
