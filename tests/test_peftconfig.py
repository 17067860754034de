"""One PEFT-config writer: per-module ranks and alphas that PEFT gives to their own module only.

The model below has a module whose name is a suffix of another's (``layers.1.q_proj`` and
``vision.layers.1.q_proj``): a pattern key or target that is not anchored hands one module's rank to the
other. PEFT itself is the reference: it loads what loramgr writes, and its layers get the right ranks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from factories import peft_adapter_from_model, write_peft_adapter
from safetensors.torch import load_file
from torch import nn

from loramgr.adapter import LoraAdapter
from loramgr.formats.convert import to_diffusers_file, to_peft_folder
from loramgr.formats.peft import read_peft_folder
from loramgr.merge import MergeOptions, combine

peft = pytest.importorskip("peft")

# module -> (rank, alpha); the rank-2 module's name is the tail of a rank-4 module's name
MODULES = {"layers.0.q_proj": (4, 8.0), "layers.1.q_proj": (2, 3.0), "vision.layers.1.q_proj": (4, 8.0)}


class TwoTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Module(), nn.Module()])
        self.vision = nn.Module()
        self.vision.layers = nn.ModuleList([nn.Module(), nn.Module()])
        for layer in [*self.layers, *self.vision.layers]:
            layer.q_proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.layers, *self.vision.layers]:
            x = torch.tanh(layer.q_proj(x))
        return x


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    """A valid PEFT folder for TwoTowers (its own pattern keys anchored, as PEFT users must write them)."""
    return write_peft_adapter(
        tmp_path / "source",
        {name: (8, 8, rank) for name, (rank, _) in MODULES.items()},
        alpha=8.0,
        extra_config={"rank_pattern": {r"^layers\.1\.q_proj": 2}, "alpha_pattern": {r"^layers\.1\.q_proj": 3.0},
                      "task_type": None},
    )


def expected_delta(folder: Path, module: str) -> torch.Tensor:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a, b = (tensors[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    rank, alpha = MODULES[module]
    return (alpha / rank) * (b @ a)


def test_converted_peft_folder_loads_in_peft_with_each_module_rank_and_scale(tmp_path: Path, source: Path) -> None:
    adapter = LoraAdapter(read_peft_folder(source), source)
    assert {m.name: (m.rank, m.alpha) for m in adapter.info.modules} == MODULES
    out = to_peft_folder(adapter, tmp_path / "out")
    model = TwoTowers()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out))
    layers = dict(loaded.base_model.model.named_modules())
    for name, (rank, _) in MODULES.items():
        assert layers[name].r["default"] == rank, name
    merged = dict(loaded.merge_and_unload().named_modules())
    originals = dict(model.named_modules())
    for name in MODULES:
        delta = merged[name].weight.detach() - originals[name].weight.detach()
        torch.testing.assert_close(delta, expected_delta(source, name), atol=1e-6, rtol=1e-5)
    # a target name can be the tail of another path: PEFT wraps that module too, and it changes nothing
    other = "vision.layers.0.q_proj"
    assert torch.equal(merged[other].weight.detach(), originals[other].weight.detach())


def test_diffusers_metadata_gives_peft_each_module_rank(tmp_path: Path, source: Path) -> None:
    out = to_diffusers_file(LoraAdapter(read_peft_folder(source), source), tmp_path / "d.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        packed = json.loads(handle.metadata()["lora_adapter_metadata"])
    # diffusers builds a LoraConfig from these fields (unet.* for the unet component)
    config = peft.LoraConfig(**{k.removeprefix("unet."): v for k, v in packed.items()})
    model = peft.get_peft_model(TwoTowers(), config)
    layers = dict(model.base_model.model.named_modules())
    for name, (rank, alpha) in MODULES.items():
        assert (layers[name].r["default"], layers[name].lora_alpha["default"]) == (rank, alpha), name


def test_merge_of_a_unet_style_adapter_loads_in_peft(tmp_path: Path) -> None:
    """Targets are module names, not leaves: the "0" of to_out.0 would also match the block "blocks.0"."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = nn.Linear(8, 8)
            self.to_out = nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.0)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.to_out[0](torch.relu(self.to_q(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    model = Net().eval()
    folders = [
        peft_adapter_from_model(model, tmp_path / name, r=r, target_modules=["to_q", "to_out.0"], seed=seed)
        for name, r, seed in (("a", 2, 1), ("b", 4, 2))
    ]
    adapters = [LoraAdapter(read_peft_folder(f), f, label=f.name) for f in folders]
    merged = combine(adapters, MergeOptions(method="linear", weights=(1.0, 1.0)))
    merged.save_pretrained(tmp_path / "merged")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "merged")).eval()
    both = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folders[0]), adapter_name="a")
    both.load_adapter(str(folders[1]), adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), both.eval()(x), atol=1e-5, rtol=1e-5)
