"""Where each stage reads and writes by default (relative to the repo root, where DVC runs stages).

dvc.yaml declares the same paths as deps/outs; tests/pipeline checks that the two agree.
"""

from pathlib import Path

RAW_DIR = Path("data/raw")
PRETRAINED_DIR = Path("models/pretrained")
TOKENIZER_DIR = Path("artifacts/tokenizer")
CHUNKED_DIR = Path("data/chunked")
BASE_MODEL_DIR = Path("models/base")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
STAGE1_ENCODER_DIR = Path("models/stage1_encoder")
STAGE1_DECODER_DIR = Path("models/stage1_decoder")
STAGE1_JOINT_DIR = Path("models/stage1_joint")
STAGE1_MERGED_DIR = Path("models/stage1_merged")
SOFT_LABELS_DIR = Path("data/soft_labels")
LATENT_MODEL_DIR = Path("models/latent")
RESULTS_DIR = Path("results")
