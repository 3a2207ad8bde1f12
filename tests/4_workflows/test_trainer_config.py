"""The trainer's configuration (TrainConfig): the defaults and their round trip, TOML and JSON config files, bad
files and bad values, those of the training extras (optimizer, momentum, label smoothing, EMA, samples, the
gradient exchange) included. The trainer itself on tiny models is tested in test_trainer_runs.py."""
import json

import pytest

import cllm
from cllm.train.config import TrainConfig


# ------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------
def test_defaults_are_valid_and_round_trip():
    c = TrainConfig()
    assert c.tokenizer == "byte" and c.max_seq_len == 128 and c.max_time and c.patience is None
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()
    assert c.model_config(256) == cllm.ModelConfig(vocab_size=256, max_seq_len=128, embedding_dim=c.embedding_dim,
                                                   num_layers=c.num_layers, num_heads=c.num_heads,
                                                   ff_dim=4 * c.embedding_dim)


def test_toml_and_json_config_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 1e-3\nbetas = [0.8, 0.99]\nmax_steps = 7\ndata = ["a.txt", "b"]\npatience = 3\n'
                    'schedule = "linear"\nprogress = false\n')
    c = TrainConfig.from_file(toml)
    assert (c.lr, c.betas, c.max_steps, c.data, c.patience, c.schedule, c.progress) == \
        (1e-3, (0.8, 0.99), 7, ("a.txt", "b"), 3, "linear", False)
    assert TrainConfig.from_file(toml, max_steps=9).max_steps == 9  # overrides win
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"embedding-dim": 64, "num_heads": 8, "grad_clip": None, "min_lr": 0}))
    c = TrainConfig.from_file(js)
    assert (c.embedding_dim, c.num_heads, c.grad_clip, c.min_lr) == (64, 8, None, 0.0)


@pytest.mark.parametrize("content, suffix, words", [
    ('lr = 1e-3\nlearning_rate = 2\n', ".toml", "unknown setting learning_rate"),
    ('max_steps = "many"\n', ".toml", "max_steps must be an int"),
    ('lr = [1\n', ".toml", "cannot parse config"),
    ('{"lr": 0.1, "min_lr": 0.5}', ".json", "min_lr"),
    ('{"schedule": "step"}', ".json", "schedule must be one of"),
    ('[1, 2]', ".json", "must be a table"),
    ('{"embedding_dim": 30, "num_heads": 4}', ".json", "not divisible"),
    ('lr: 1', ".yaml", "unknown config file type"),
])
def test_bad_config_files(tmp_path, content, suffix, words):
    path = tmp_path / ("cfg" + suffix)
    path.write_text(content)
    with pytest.raises(ValueError, match=words) as e:
        TrainConfig.from_file(path)
    assert str(path) in str(e.value) or "min_lr" in words or "divisible" in words or "must be" in words
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_file(tmp_path / "absent.toml")


def test_bad_values():
    for kw in (dict(batch_size=0), dict(dropout=1.0), dict(betas=(0.9,)), dict(on_nonfinite="ignore"),
               dict(patience=0), dict(lr=float("inf")), dict(tokenizer="char"), dict(progress="yes")):
        with pytest.raises(ValueError):
            TrainConfig(**kw)


@pytest.mark.parametrize("kw, words", [
    (dict(optimizer="adam"), "optimizer must be one of adamw, sgd"),
    (dict(momentum=1.0), "momentum must be in [0, 1)"),
    (dict(momentum=-0.1), "momentum"),
    (dict(label_smoothing=1.5), "label_smoothing must be in [0, 1]"),
    (dict(label_smoothing=float("nan")), "label_smoothing must be a finite number"),
    (dict(ema_decay=1.0), "ema_decay must be in (0, 1)"),
    (dict(ema_decay=0.0), "ema_decay"),
    (dict(ema_decay="0.9"), "ema_decay must be a number"),
    (dict(sample_every=0), "sample_every must be positive"),
    (dict(sample_every=1.5), "sample_every must be an int"),
    (dict(bucket_mb=-1.0), "bucket_mb must be in [0, 1024] MiB (0: one bucket), got -1.0"),
    (dict(bucket_mb=float("inf")), "bucket_mb"),
    (dict(grad_dtype="fp16"), "grad_dtype must be one of fp32, bf16"),
    (dict(zero=True, optimizer="sgd"), "zero shards AdamW's moments: it needs optimizer adamw, got sgd"),
    (dict(zero=True, grad_dtype="bf16"), "zero with grad_dtype bf16 is not supported: use grad_dtype fp32"),
])
def test_extras_bad_values(kw, words):
    with pytest.raises((TypeError, ValueError)) as e:
        TrainConfig(**kw)
    assert words in str(e.value)
