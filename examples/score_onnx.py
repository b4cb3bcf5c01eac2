"""Score (query, text) pairs with a kubedistill student's ONNX export, using only onnxruntime and tokenizers.

    pip install onnxruntime tokenizers numpy
    echo '{"query": "vegan brunch", "texts": ["Green Fork | restaurant | offers vegan brunch", "Iron Gym"]}' \
        | python score_onnx.py <model>/onnx [model.onnx | model-int8.onnx]

prints, per text, what the student's /score answers: `label`, `probabilities` and `score` (the expected
relevance grade in [0, 1]). Nothing here imports kubedistill, PyTorch or transformers: the graph holds the
encoder, pooling, head, temperature and decision offsets, and tokenizer.json holds the truncation and padding.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def score(directory: Path, query: str, texts: list[str], model: str = "model.onnx") -> list[dict]:
    config = json.loads((directory / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(directory / config["tokenizer"]))  # truncation and padding as saved
    session = ort.InferenceSession(str(directory / model), providers=["CPUExecutionProvider"])
    encodings = tokenizer.encode_batch([(query, t) for t in texts])
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    feeds = {name: np.array([getattr(e, fields[name]) for e in encodings], np.int64) for name in config["inputs"]}
    probabilities, scores, labels = session.run(config["outputs"], feeds)
    return [
        {
            "label": config["labels"][int(k)],
            "probabilities": dict(zip(config["labels"], p.tolist(), strict=True)),
            "score": float(s),
        }
        for p, s, k in zip(probabilities, scores, labels, strict=True)
    ]


if __name__ == "__main__":
    request = json.load(sys.stdin)
    model = sys.argv[2] if len(sys.argv) > 2 else "model.onnx"
    print(json.dumps(score(Path(sys.argv[1]), request["query"], request["texts"], model)))
