"""Test helpers: tiny random LMs of each family, a throwaway PostgreSQL server, a published SAE."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=4, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       max_position_embeddings=256)),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=16, max_position_embeddings=256)),
    # Gemma 2/3 and OLMo 2 normalise the attention and MLP outputs before adding them to the residual stream.
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
                                    query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
                                        query_pre_attn_scalar=16)),
    "olmo2": ("Olmo2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
}


def train_tokenizer(folder: Path, vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on the pydoc corpus (no network needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trainer.corpus import PydocCorpus

    texts = [d.text for d in PydocCorpus().docs[:1500]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a randomly initialised model of `family` plus a trained tokenizer into `folder`."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    cls_name, kwargs = FAMILY_CONFIGS[family]
    config = getattr(transformers, cls_name)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


def load_family_lm(folder: Path, tiny_model_dir: Path, family: str):
    """A tiny random model of `family` in `folder`, sharing the session's tiny tokenizer (training
    one per family would cost more than the models), loaded in float32 on the CPU."""
    import transformers

    from trainer.lm import load_lm

    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    cls_name, kwargs = FAMILY_CONFIGS[family]
    config = getattr(transformers, cls_name)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, **kwargs)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return load_lm(str(folder), "cpu", "float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster on loopback, started with initdb/pg_ctl.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` system
    user and commands run through runuser; otherwise they run as the current user.
    """

    def __init__(self):
        self.bindir = find_pg_bindir()
        if self.bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found")
        self.root = Path(tempfile.mkdtemp(prefix="atlas-pg-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True)

    def start(self) -> PostgresServer:
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        conf = ("listen_addresses = '127.0.0.1'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                f"unix_socket_directories = '{self.root}'\nmax_connections = 200\nshared_buffers = 128MB\n")
        with open(self.datadir / "postgresql.conf", "a") as fh:
            fh.write(conf)
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port}", "start")
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self, wait: float = 0.0, mode: str = "fast") -> None:
        """Stop the server (fast: sessions are cut, open transactions lost, commits kept), optionally
        wait, and start it again on the same port."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "stop", check=False)
        time.sleep(wait)
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port}", "start")


def find_pg_bindir() -> Path | None:
    for candidate in [os.environ.get("PG_BINDIR")] + sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if candidate and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None
