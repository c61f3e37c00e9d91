"""Every variant of every variants file applies to the configs it names and parses through the real CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_vision_configs import cifar_overrides

from lightning_adamw import OneCycleWD, ScheduleFreeEval
from lightning_adamw.cli import main
from lightning_adamw.experiments.runs import deep_merge, default_variants_file
from lightning_adamw.registry import get_optimizer_entry

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "configs" / "variants").glob("*.yaml"))


def _cases(path: Path) -> list[str]:
    spec = yaml.safe_load(path.read_text())
    if "base" not in spec:
        return list(spec["variants"])
    # a tuning grid (base: config): one point per optimizer family, the others differ only in lr and wd values
    families = {name.split("_lr")[0]: name for name in reversed(list(spec["variants"]))}
    return sorted(families.values(), key=list(spec["variants"]).index)


CASES = [(f, name) for f in FILES for name in _cases(f)]


def test_variants_files_exist_and_name_their_configs() -> None:
    assert FILES
    for path in FILES:
        for config in yaml.safe_load(path.read_text())["applies_to"]:
            assert (ROOT / "configs" / config).is_file(), f"{path.name} names missing {config}"
            assert default_variants_file(ROOT / "configs" / config) == path


@pytest.mark.parametrize("path, name", CASES, ids=[f"{f.stem}-{n}" for f, n in CASES])
def test_variant_parses(path: Path, name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = yaml.safe_load(path.read_text())
    config = ROOT / "configs" / (spec.get("base") or spec["applies_to"][0])
    merged = deep_merge(deep_merge(yaml.safe_load(config.read_text()), spec["variants"][name] or {}),
                        spec.get("evaluate", {}))
    target = tmp_path / "variant.yaml"
    target.write_text(yaml.safe_dump(merged))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(target), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    optimizer = printed["model"]["init_args"]["optimizer"]
    wanted = ((spec["variants"][name] or {}).get("model", {}).get("init_args", {}).get("optimizer", {}))
    for key, value in wanted.items():
        assert optimizer[key] == value, (key, optimizer[key], value)


CIFAR = ROOT / "configs" / "variants" / "cifar10.yaml"
CIFAR_VARIANTS = sorted(yaml.safe_load(CIFAR.read_text())["variants"])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", CIFAR_VARIANTS)
def test_cifar_variant_trains_on_real_data(name: str, shared_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CIFAR-10 variant, merged into the quickstart config, runs a fast_dev_run on the real images with the
    optimizer it names and the callback that owns its schedule (OneCycleWD, or ScheduleFreeEval)."""
    monkeypatch.setattr(sys, "argv", ["lightning_adamw"])
    spec = yaml.safe_load(CIFAR.read_text())
    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    merged = deep_merge(quickstart, spec["variants"][name] or {})
    target = tmp_path / "variant.yaml"
    target.write_text(yaml.safe_dump(merged))
    cli = main(["fit", "--config", str(target), *cifar_overrides(shared_data, tmp_path)])
    optimizer = cli.trainer.optimizers[0]
    entry = get_optimizer_entry(cli.model.optimizer_config.name)
    factory = entry.factory.resolve() if hasattr(entry.factory, "resolve") else entry.factory
    assert isinstance(optimizer, factory)
    owner = ScheduleFreeEval if name.startswith("schedulefree") else OneCycleWD
    assert any(isinstance(c, owner) for c in cli.trainer.callbacks)
    assert not any(isinstance(c, OneCycleWD) for c in cli.trainer.callbacks) or owner is OneCycleWD
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
