"""What every logger shares: which settings are credentials, and the run clock across resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons._logging_common import is_secret_key, to_plain
from zae_trainer.addons.local_logger import LocalLoggerAddon, read_jsonl
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer

CREDENTIALS = ["token", "api_token", "api_tkn", "hf_token", "HF_TOKEN", "secret", "client_secret", "password",
               "db_password", "passwd", "api_key", "apiKey", "APIKey", "apikey", "access_key", "aws_secret_access_key",
               "private_key", "credential", "credentials", "auth", "basic_auth"]
HYPERPARAMETERS = ["key_dim", "monkey", "keys", "num_keys", "key", "max_tokens", "tokenizer", "tokenizer_name",
                   "author", "authority", "passes", "secretary_count"]


@pytest.mark.parametrize("key", CREDENTIALS)
def test_credentials_are_redacted(key: str) -> None:
    assert is_secret_key(key)
    assert to_plain({"wandb": {key: "s3cr3t-value"}}) == {"wandb": {key: "<redacted>"}}


@pytest.mark.parametrize("key", HYPERPARAMETERS)
def test_hyperparameters_that_merely_contain_the_letters_are_kept(key: str) -> None:
    assert not is_secret_key(key)
    assert to_plain({"model": {key: 64}}) == {"model": {key: 64}}


def test_the_run_clock_continues_across_a_resume_and_restarts_for_a_new_run(tmp_path: Path) -> None:
    def build(**manager: object) -> object:
        cls = TinyRegressionTrainer.add_on(LocalLoggerAddon(log_dir=tmp_path / "logs", tensorboard=False),
                                           StateManagerAddon(save_path=tmp_path / "ckpt", **manager))
        return tiny_trainer(cls)

    first = build()
    first.run(1, tiny_loader())  # type: ignore[attr-defined]
    saved = first.get_addon("local_logger").state_dict()["seconds"]  # type: ignore[attr-defined]
    assert saved == pytest.approx(first.summary.seconds)  # type: ignore[attr-defined]
    resumed = build(resume="latest")
    resumed.run(2, tiny_loader())  # type: ignore[attr-defined]
    records = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    epoch_1_end = next(r["time"] for r in records if r["kind"] == "epoch")  # about what the checkpoint holds
    epoch_2 = [r for r in records if r["epoch"] == 2]
    assert epoch_2 and all(r["time"] > epoch_1_end for r in epoch_2)  # continued, not restarted at 0
    logger = resumed.get_addon("local_logger")  # type: ignore[attr-defined]
    assert logger.run_seconds > resumed.summary.seconds  # type: ignore[attr-defined]  # the whole run, not this process
    fresh = build()
    fresh.run(1, tiny_loader())  # type: ignore[attr-defined]
    assert max(r["time"] for r in read_jsonl(tmp_path / "logs" / "metrics.jsonl")) <= fresh.summary.seconds  # type: ignore[attr-defined]
