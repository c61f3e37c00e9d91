"""Every language-model config through the real CLI (``lightning_adamw.cli.main``): ``--print_config``, the recipe's
values, a ``fast_dev_run`` on the shared WikiText-2 files with a shrunk network, and fit -> test from a checkpoint."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_adamw import OneCycleWD
from lightning_adamw.cli import main
from lightning_adamw.decay import DECOUPLED_WD_KEY, DecoupledWeightDecay
from lightning_adamw.experiments.runs import deep_merge

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["wikitext2_awd_lstm.yaml", "wikitext2_qrnn.yaml", "wikitext2_small.yaml"]


@pytest.fixture(autouse=True)
def in_checkout(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """The CLI imports the zoo from the current directory and reads only `args` (not pytest's command line); one
    thread (shared CPU cores, tiny networks)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning_adamw"])


def shared_data_args(shared_data: Path, tmp_path: Path) -> list[str]:
    """Point the data at the shared files (valid as train), shrink the network, write into tmp_path."""
    return [
        f"--data.init_args.data_dir={shared_data / 'wikitext-2'}",
        "--data.init_args.download=false",
        "--data.init_args.train_split=valid",
        "--data.init_args.batch_size=4",
        "--data.init_args.bptt=10",
        "--data.init_args.eval_bptt=50",
        "--model.init_args.network.init_args.emb_size=8",
        "--model.init_args.network.init_args.hidden_size=16",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]


@pytest.mark.parametrize("config", CONFIGS)
def test_print_config(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config=configs/{config}", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "models.language_model.LanguageModel"
    assert printed["data"]["class_path"] == "datamodules.wikitext2.WikiText2"
    assert printed["trainer"]["callbacks"][0]["init_args"]["schedule"]["class_path"] == "lightning_adamw.OneCycleLM"


@pytest.mark.parametrize(
    ("config", "network", "sizes", "drops", "ar_tar", "wd"),
    [
        ("wikitext2_awd_lstm.yaml", "AWDLSTM", (400, 1150, 3), (0.6, 0.4, 0.5, 0.1, 0.2), (3.0, 1.5), 1.2e-6),
        ("wikitext2_qrnn.yaml", "AWDQRNN", (400, 1550, 4), (0.4, 0.4, 0.1, 0.1, 0.2), (2.0, 1.0), 1.0e-6),
    ],
)
def test_configs_hold_the_recipe(
    config: str, network: str, sizes: tuple, drops: tuple, ar_tar: tuple, wd: float
) -> None:
    """The WikiText-2 rows of ../shared/RECIPES.md (dropouts in the order input, output, weight, embedding, hidden)."""
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    net = model["network"]["init_args"]
    assert model["network"]["class_path"] == network
    assert (net["emb_size"], net["hidden_size"], net["num_layers"]) == sizes
    assert tuple(net[f"dropout_{k}"] for k in ("input", "output", "weight", "embedding", "hidden")) == drops
    assert (model["ar_alpha"], model["tar_beta"]) == ar_tar
    assert (model["ar_on"], model["scale_lr_by_seq_len"]) == ("undropped", False)  # the study's loop
    assert model["optimizer"] == {"name": "adam", "lr": 5e-3, "betas": [0.8, 0.99], "weight_decay": wd, "wd_mode": "l2"}
    assert (model["cache_theta"], model["cache_lambda"], model["cache_window"]) == (0.662, 0.1279, 3785)
    assert (trainer["max_epochs"], trainer["gradient_clip_val"]) == (90, 0.12)
    assert (data["batch_size"], data["bptt"], data["eval_batch_size"]) == (100, 70, 1)
    if network == "AWDQRNN":
        assert net["first_window"] == 2 and net["output_gate"] is True


@pytest.mark.parametrize("config", CONFIGS)
def test_fast_dev_run_on_the_shared_data(config: str, shared_data: Path, tmp_path: Path) -> None:
    cli = main(["fit", f"--config=configs/{config}", *shared_data_args(shared_data, tmp_path),
                "--trainer.fast_dev_run=1"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/ppl"])
    assert cli.model.network.vocab_size == cli.datamodule.vocab_size == 13_777  # linked through the datamodule
    assert cli.model.lr_scale == 1.0  # the study's loop does not scale the lr by seq_len / bptt


def test_decoupled_weight_decay_is_one_override_away(shared_data: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config=configs/wikitext2_awd_lstm.yaml", *shared_data_args(shared_data, tmp_path),
                "--model.init_args.optimizer.wd_mode=decoupled", "--model.init_args.optimizer.weight_decay=0.1",
                "--trainer.fast_dev_run=1"])
    optimizer = cli.trainer.optimizers[0]
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.0 and group[DECOUPLED_WD_KEY] == 0.1  # not in the gradient: decoupled
    assert isinstance(DecoupledWeightDecay.of(optimizer).owner, OneCycleWD)  # the config's callback drives it


def test_fit_then_test_from_the_checkpoint_with_the_cache(shared_data: Path, tmp_path: Path) -> None:
    args = shared_data_args(shared_data, tmp_path)
    fit = main(["fit", "--config=configs/wikitext2_qrnn.yaml", *args, "--trainer.max_steps=3",
                "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0"])
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    assert Path(checkpoint).is_file()
    # a test datamodule whose train file differs: the checkpoint's vocabulary (and network size) win
    with pytest.warns(UserWarning, match="checkpoint's vocabulary"):
        test = main(["test", "--config=configs/wikitext2_qrnn.yaml", *args, f"--ckpt_path={checkpoint}",
                     "--data.init_args.train_split=test", "--model.init_args.cache_pointer=true",
                     "--model.init_args.cache_window=200", "--trainer.limit_test_batches=4"])
    metrics = test.trainer.callback_metrics
    assert test.datamodule.vocab_size == test.model.network.vocab_size == 13_777
    assert math.isfinite(metrics["test/ppl"]) and math.isfinite(metrics["test/ppl_cache"])
    fit_weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, value in test.model.state_dict().items():
        if name in fit_weights:
            torch.testing.assert_close(value, fit_weights[name])


LM_VARIANTS = yaml.safe_load((ROOT / "configs" / "variants" / "wikitext2.yaml").read_text())


@pytest.mark.parametrize("name", sorted(LM_VARIANTS["variants"]))
def test_every_variant_trains_on_the_shared_data(name: str, shared_data: Path, tmp_path: Path) -> None:
    """Each WikiText-2 variant, merged into the small config, runs a fast_dev_run with the optimizer it names."""
    base = yaml.safe_load((ROOT / "configs" / "wikitext2_small.yaml").read_text())
    target = tmp_path / "variant.yaml"
    target.write_text(yaml.safe_dump(deep_merge(base, LM_VARIANTS["variants"][name] or {})))
    cli = main(["fit", f"--config={target}", *shared_data_args(shared_data, tmp_path), "--trainer.fast_dev_run=1"])
    wanted = (LM_VARIANTS["variants"][name] or {}).get("model", {}).get("init_args", {}).get("optimizer", {})
    assert cli.model.optimizer_config.name == wanted.get("name", base["model"]["init_args"]["optimizer"]["name"])
    assert cli.trainer.global_step == 1 and math.isfinite(cli.trainer.callback_metrics["val/ppl"])
