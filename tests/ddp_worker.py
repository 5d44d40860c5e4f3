"""Worker of test_trainer.test_two_process_data_parallel_equals_one_process (run under torchrun, CPU, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/ddp_worker.py OUT_DIR PER_DEVICE_BATCH

Trains a tiny Llama with non-uniform turn weights for 2 optimizer steps (SGD) and writes, from the main process,
OUT_DIR/losses.json (logged losses) and OUT_DIR/params.pt (final parameters).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from trl_helpers import logged, sft_config, tiny_model  # noqa: E402

import torch  # noqa: E402

from fused_wce.trl_integration.chat_data import build_tokenizer, load_default_dataset  # noqa: E402
from fused_wce.trl_integration import TurnWeighting, WeightedSFTTrainer  # noqa: E402


def main(out_dir: str, per_device_batch: int) -> None:
    tokenizer = build_tokenizer()
    trainer = WeightedSFTTrainer(
        tiny_model("llama", tokenizer),
        args=sft_config(out_dir, per_device_train_batch_size=per_device_batch, max_steps=2, optim="sgd",
                        learning_rate=0.5, lr_scheduler_type="constant", ddp_backend="gloo"),
        train_dataset=load_default_dataset().select(range(32)),
        processing_class=tokenizer,
        weighting=TurnWeighting(role_weights={"assistant": 1.0, "user": 0.3}, decay=0.5),
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps(logged(trainer, "loss")))
        model = trainer.accelerator.unwrap_model(trainer.model)
        torch.save({name: p.detach().cpu() for name, p in model.named_parameters()}, out / "params.pt")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
