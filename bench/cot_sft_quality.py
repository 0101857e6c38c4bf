"""CoT-SFT base model on the embedded default: Pass@1 (math-verify) per split and training time.

Runs prepare_data, tokenizer and base_model with the given params in a scratch folder (the DVC workspace is
left alone), decodes every evaluation split greedily and writes the table into BENCHMARKS.md.

    python -m bench.cot_sft_quality [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.report import machine_line, update_section
from latent_sft_core.base_model import tokenized_split, train_base_model
from latent_sft_core.config import DecodingParams, load_params
from latent_sft_core.data.prepare import prepare_data
from latent_sft_core.inference import decode
from latent_sft_core.modeling import load_model
from latent_sft_core.scoring import answer_text, pass_at_1
from latent_sft_core.stage import setup_logging
from latent_sft_core.text import build_tokenizer, special_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    setup_logging()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory(prefix="bench-cot-sft-") as folder:
        work = Path(folder)
        prepare_data(params, work / "raw")
        build_tokenizer(params, work / "raw", work / "tokenizer")
        metrics = train_base_model(params, work / "raw", work / "tokenizer", work / "base", work / "metrics.json",
                                   work / "loss.csv", scratch_dir=work / "scratch")
        model, tokenizer = load_model(work / "base")
        decoding = DecodingParams(batch_size=params.base_model.eval_batch_size,
                                  max_new_tokens=params.base_model.max_new_tokens)
        rows = []
        for split in ("test", "hard", "reworded", "two_step"):
            examples = tokenized_split(params, work / "raw" / f"{split}.parquet", tokenizer)
            started = time.perf_counter()
            decoded = decode(model, [e.prompt_ids for e in examples], special_ids(tokenizer), decoding, latent=None)
            seconds = time.perf_counter() - started
            accuracy = pass_at_1([answer_text(d, tokenizer) for d in decoded], [e.answer for e in examples])
            chain = sum(len(d.reasoning_ids) for d in decoded) / len(decoded)
            rows.append((split, len(examples), accuracy, chain, seconds))
    model_line = (f"{metrics['parameters'] / 1e6:.2f}M-parameter Llama, {metrics['steps']} steps of batch "
                  f"{params.base_model.train.batch_size}, training {metrics['train_seconds']:.0f} s")
    table = "\n".join(f"| {s} | {n} | {100 * a:.1f} | {c:.1f} | {t:.1f} |" for s, n, a, c, t in rows)
    update_section(
        "cot_sft_quality",
        f"""## CoT-SFT base model on the embedded default

`python -m bench.cot_sft_quality` ({machine_line()}). {model_line}.
Greedy decoding; math-verify Pass@1 of the text after `</think>`.

| split | rows | Pass@1 % | mean chain tokens | decode s |
|---|---|---|---|---|
{table}
""",
    )
    print(json.dumps({"metrics": metrics, "splits": rows}, indent=2))


if __name__ == "__main__":
    main()
