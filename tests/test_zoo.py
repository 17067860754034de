"""The zoo: every adapter case of tests/zoo.py through loramgr, held against PEFT loading the same folder.

For each (model, adapter) case: ``install`` and ``show`` report what PEFT's config and PEFT's loaded layers
say (r, targets, each module's rank); ``check`` against the saved base finds no error (PEFT loads every
zoo adapter into that base); ``apply`` gives PEFT's output (``PeftModel.from_pretrained``) and ``fuse``
gives the output of PEFT's ``merge_and_unload``, within 1e-5 relative, on the same input. Where loramgr
cannot be exact it must refuse, with a one-line :class:`~loramgr.errors.LoramgrError`: a refusal passes,
a silent approximation fails.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import run_cli
from zoo import CASES, KNOWN_WRONG, MODELS, Case, make_adapter, output_of, sample_inputs

from loramgr.adapter import LoraAdapter
from loramgr.errors import LoramgrError

PEFT_PREFIX = "base_model.model."


class Built:
    """One model of the zoo, its saved checkpoint and the adapters made on it (built on first use)."""

    def __init__(self, root: Path, model_name: str) -> None:
        self.name = model_name
        self.model = MODELS[model_name]()
        self.base = root / "base"
        self.model.save_pretrained(str(self.base))
        self.root = root
        self.inputs = sample_inputs(model_name, self.model)

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    return {}


def built(zoo: dict[str, Built], tmp_path_factory: pytest.TempPathFactory, model_name: str) -> Built:
    if model_name not in zoo:
        zoo[model_name] = Built(tmp_path_factory.mktemp(f"zoo-{model_name}"), model_name)
    return zoo[model_name]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


@pytest.fixture
def case_env(request: pytest.FixtureRequest, zoo: dict[str, Built], adapters: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Built, Path]:
    case: Case = request.param
    env = built(zoo, tmp_path_factory, case.model)
    if case.id not in adapters:
        adapters[case.id] = make_adapter(case, env.model, env.root / case.name)
    return case, env, adapters[case.id]


def refused_in_one_line(error: LoramgrError) -> None:
    text = str(error)
    assert text and "\n" not in text, text
    assert "Traceback" not in text


def peft_loaded(env: Built, folder: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(env.fresh(), str(folder)).eval()


def peft_ranks(peft_model: torch.nn.Module) -> dict[str, int]:
    """Module path -> rank of every LoRA layer PEFT built (the model's own paths, no PeftModel prefix)."""
    from peft.tuners.lora import LoraLayer

    ranks = {}
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer):
            path = name.removeprefix(PEFT_PREFIX)
            parameter = getattr(layer, "parameter_name", None)  # a ParamWrapper (target_parameters): one parameter
            if parameter:
                path = path.replace(".base_layer", "") + "." + parameter
            ranks[path] = layer.r["default"]
    return ranks


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    scale = theirs.abs().max().item() or 1.0
    difference = (ours - theirs).abs().max().item()
    assert difference <= 1e-5 * scale + 1e-6, f"{what}: max difference {difference:.3g} (output scale {scale:.3g})"


def zoo_params(operation: str) -> list[Any]:
    """Every case for ``operation``; a case main gets silently wrong (zoo.KNOWN_WRONG) is a strict xfail, so the
    fix that makes it exact must also drop it from the list."""
    params = []
    for case in CASES:
        reason = KNOWN_WRONG.get((case.id, operation))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params



@pytest.mark.parametrize("case_env", zoo_params("show"), indirect=True)
def test_install_and_show_report_what_peft_says(case_env: tuple[Case, Built, Path]) -> None:
    from peft import LoraConfig

    case, env, folder = case_env
    from click.testing import CliRunner

    from loramgr.cli.main import cli

    result = CliRunner().invoke(cli, ["install", str(folder), "--name", case.id, "--version", "1.0.0"])
    if result.exit_code != 0:
        output = result.output.strip()
        assert result.exit_code == 1 and output.startswith("Error: ") and "\n" not in output, output
        return
    shown = json.loads(run_cli("show", f"{case.id}==1.0.0", "--json").output)
    config = LoraConfig.from_pretrained(str(folder))
    assert shown["config"]["r"] == config.r
    targets = config.target_modules or config.target_parameters  # MoE experts: PEFT targets parameters
    if isinstance(targets, str):
        assert shown["target_modules"] == [targets]
    else:
        assert sorted(shown["target_modules"]) == sorted(targets or [])
    peft_model = peft_loaded(env, folder)
    ours = {m["name"]: m["rank"] for m in shown["modules"]}
    theirs = peft_ranks(peft_model)
    for name, rank in theirs.items():
        assert ours.get(name) == rank, f"{name}: PEFT has rank {rank}, show says {ours.get(name)}"
    assert set(ours) >= set(theirs)
    assert shown["rank"] == max(theirs.values())  # the largest module rank, what a server's rank limit is held to


@pytest.mark.parametrize("case_env", zoo_params("check"), indirect=True)
def test_check_finds_no_error_where_peft_loads(case_env: tuple[Case, Built, Path]) -> None:
    from loramgr.compat.check import check

    case, env, folder = case_env
    peft_loaded(env, folder)  # PEFT loads it into this base
    try:
        report = check([folder], base=env.base)
    except LoramgrError as error:  # loramgr cannot read this adapter: the same refusal install gives
        refused_in_one_line(error)
        return
    assert report.ok, [str(f) for f in report.errors]


def installed(case: Case, folder: Path) -> LoraAdapter | None:
    """The case's adapter installed through the Python API and opened from the registry; None when install
    refuses it (in one line)."""
    from loramgr.api import get, install

    try:
        install(folder, name=case.id, version="1.0.0")
    except LoramgrError as error:
        refused_in_one_line(error)
        return None
    return get(f"{case.id}==1.0.0")


@pytest.mark.parametrize("case_env", zoo_params("apply"), indirect=True)
def test_apply_matches_peft_from_pretrained(case_env: tuple[Case, Built, Path]) -> None:
    from loramgr.model.peftmodel import apply

    case, env, folder = case_env
    expected = output_of(peft_loaded(env, folder), env.inputs)
    adapter = installed(case, folder)
    if adapter is None:
        return
    try:
        applied = apply(env.fresh(), adapter)
    except LoramgrError as error:
        refused_in_one_line(error)
        return
    close(output_of(applied.eval(), env.inputs), expected, f"apply {case.id}")


@pytest.mark.parametrize("case_env", zoo_params("fuse"), indirect=True)
def test_fuse_matches_peft_merge_and_unload(case_env: tuple[Case, Built, Path]) -> None:
    from loramgr.model.weights import fuse

    case, env, folder = case_env
    expected = output_of(peft_loaded(env, folder).merge_and_unload(), env.inputs)
    adapter = installed(case, folder)
    if adapter is None:
        return
    model = env.fresh()
    try:
        fuse(model, adapter, allow_tied=True)
    except LoramgrError as error:
        refused_in_one_line(error)
        assert all(torch.equal(v, env.model.state_dict()[k]) for k, v in model.state_dict().items()), \
            "a refused fuse leaves the model as it was"
        return
    close(output_of(model, env.inputs), expected, f"fuse {case.id}")
