"""The ShapesBench tables of docs/results.md from the reports of ``shapes_eval.sh``.

    .venv/bin/python training/recipes/shapes_table.py runs/shapes/eval

Two tables: the recipe's products (and the earlier sessions' runs they replaced), then the
trials: runs outside the recipe, each one change against a recipe run at equal steps or compute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [  # report (relative to the eval folder), what it is, the decoder its pictures came from
    ("teacher", "teacher (SD3 MMDiT, 6000 steps at 64 px + 2000 at 128 px)", "full"),
    ("pretrain-4k", "student, no KD, 3000 steps at 64 px + 1000 at 128 px (pretrain's snapshot)", "tiny v2"),
    ("pretrain4-4k", "the same snapshot (not step-distilled)", "tiny v2"),
    ("kd", "student, multi-level KD, 3000 steps at 64 px + 1000 at 128 px", "tiny v2"),
    ("pretrain", "student, no KD, 3000 steps at 64 px + 5000 at 128 px", "tiny v2"),
    ("pretrain4", "student, no KD, 3000 at 64 px + 5000 at 128 px (not step-distilled)", "tiny v2"),
    ("ladd4", "**LADD student of the no-KD parent: the default**", "tiny v2"),
    ("ladd8", "LADD student of the no-KD parent", "tiny v2"),
    # Session 7's runs (text tokens from MiniLM's last layer only; 128 px teacher and KD pair).
    ("session7/teacher", "session 7: teacher, 3000 steps at 128 px", "full"),
    ("session7/pretrain-2k", "session 7: student, no KD, 2000 steps at 128 px", "tiny v2"),
    ("session7/kd", "session 7: student, multi-level KD, 2000 steps at 128 px", "tiny v2"),
    ("session7/pretrain", "session 7: student, no KD, 3000 steps at 64 px + 5000 at 128 px", "tiny v2"),
    ("session7/pretrain4", "session 7: the same (not step-distilled)", "tiny v2"),
    ("session7/ladd4", "session 7: LADD student of that parent (then the default)", "tiny v2"),
    ("session7/ladd8", "session 7: LADD student of that parent", "tiny v2"),
    # Session 5's runs (128 px only: the 6000-step parent and its LADD student, then the default).
    ("session5/pretrain", "session 5: student, no KD, 6000 steps at 128 px", "tiny v2"),
    ("session5/pretrain4", "session 5: student, no KD, 6000 steps at 128 px (not step-distilled)", "tiny v2"),
    ("session5/ladd4", "session 5: LADD student of the 6000-step parent (then the default)", "tiny v2"),
    ("session5/ladd8", "session 5: LADD student of the 6000-step parent", "tiny v2"),
    # Session 4's runs (the 4000-step parent and its LADD student, then the default).
    ("session4/pretrain", "session 4: student, no KD, 4000 steps", "tiny v2"),
    ("session4/pretrain4", "session 4: student, no KD, 4000 steps (not step-distilled)", "tiny v2"),
    ("session4/ladd4", "session 4: LADD student of the 4000-step parent (then the default)", "tiny v2"),
    ("session4/ladd8", "session 4: LADD student of the 4000-step parent", "tiny v2"),
    # Session 3's runs (decoder v1 era; LADD from the KD student), kept for the comparisons they show.
    ("session3/pretrain", "session 3: student, no KD, 2000 steps", "tiny v1"),
    ("session3/pretrain-fulldec", "session 3: student, no KD, 2000 steps", "full"),
    ("session3/pretrain4", "session 3: student, no KD, 2000 steps (not step-distilled)", "tiny v1"),
    ("session3/pretrain4-fulldec", "session 3: student, no KD, 2000 steps (not step-distilled)", "full"),
    ("session3/pretrain4-dec2", "session 3: student, no KD, 2000 steps (not step-distilled)", "tiny v2"),
    ("session3/kd", "session 3: student, multi-level KD, 2000 steps", "tiny v1"),
    ("session3/ladd4", "session 3: LADD student of the KD student", "tiny v1"),
    ("session3/ladd8", "session 3: LADD student of the KD student", "tiny v1"),
    ("session3/ladd4-dec2", "session 3: LADD student of the KD student (then the default)", "tiny v2"),
]
TRIALS = [  # runs outside the recipe, one change each; docs/results.md names the recipe row to compare with
    ("pretrain4-cooldown", "no KD, 6000 steps + 500 with the lr cooled down", "tiny v2"),
    ("pretrain-sa8", "no KD, 2000 steps, self-attention at 8x8 too", "tiny v2"),
    ("pretrain4-sa8", "no KD, 2000 steps, self-attention at 8x8 too (not step-distilled)", "tiny v2"),
    ("pretrain-td0", "no KD, 2000 steps, no transformer at 16x16", "tiny v2"),
    ("pretrain4-td0", "no KD, 2000 steps, no transformer at 16x16 (not step-distilled)", "tiny v2"),
    ("pretrain-prog", "no KD, 3000 steps at 64 px + 1000 at 128 px", "tiny v2"),
    ("pretrain4-prog", "no KD, 3000 steps at 64 px + 1000 at 128 px (not step-distilled)", "tiny v2"),
    ("ladd4-udisc", "LADD of the 6000-step parent, the parent as discriminator backbone, disc_lr 5e-4", "tiny v2"),
    # Session 9 (runs/ lost; a re-trained autoencoder): from the shipped default, not from the recipe.
    ("shipped-28g3", "session 8's default (LADD student) at 28 guided steps", "tiny v2"),
    ("finetune-n200", "that default + 2000 steps at 128 px, counting x2 (200 + 50 prompts)", "tiny v2"),
    ("ladd4-ft", "LADD of that fine-tuned parent, the parent as discriminator and target", "tiny v2"),
    ("ladd8-ft", "LADD of that fine-tuned parent, the parent as discriminator and target", "tiny v2"),
    # Session 10: the distillation target spans the parent's 28-step sampler (distill_teacher_steps: 28).
    ("ladd4-span", "the same LADD, its target the parent's 28 steps over each student step", "tiny v2"),
    ("ladd8-span", "the same LADD, its target the parent's 28 steps over each student step", "tiny v2"),
    ("ladd4-span-default", "that LADD with the generator starting from the default", "tiny v2"),
    ("ladd8-span-default", "that LADD with the generator starting from the default", "tiny v2"),
    # Session 11: the parent's guidance scale; the spanning LADD without the 8-step schedule, and cheaper.
    ("finetune-n200-g5", "session 9's fine-tuned parent at guidance 5 (200 + 50 prompts)", "tiny v2"),
    ("finetune-n200-g7", "session 9's fine-tuned parent at guidance 7 (200 + 50 prompts)", "tiny v2"),
    ("ladd4-span4", "the spanning LADD trained on 4 steps only (`student_steps: [4]`)", "tiny v2"),
    ("ladd8-span4", "the same 4-step student sampled at 8 steps (not trained for them)", "tiny v2"),
    ("ladd4-span16", "the spanning LADD with 16 teacher steps instead of 28", "tiny v2"),
    ("ladd8-span16", "the spanning LADD with 16 teacher steps instead of 28", "tiny v2"),
    # Session 12: the re-noising level of LADD's discriminator.
    ("ladd4-renoise0", "the 16-step spanning LADD re-noising around t' = 0.5 (`renoise_mean: 0`)", "tiny v2"),
    ("ladd8-renoise0", "the 16-step spanning LADD re-noising around t' = 0.5 (`renoise_mean: 0`)", "tiny v2"),
    # Sessions 12-13: a new parent with a longer 64 px phase (next-step 1), counting x2 (200 + 50 prompts).
    ("long64-8000-n200", "new parent, 6000 steps at 64 px + 2000 at 128 px, counting x2 (200 + 50 prompts)", "tiny v2"),
    ("long64-9000-n200", "the same parent at 6000 + 3000 steps (200 + 50 prompts)", "tiny v2"),
    ("long64-10000-n200", "the same parent at 6000 + 4000 steps (200 + 50 prompts)", "tiny v2"),
    # Session 14: that parent finished, on all 600 + 150 prompts, and the recipe's LADD (ladd-span16.yaml) from it.
    ("long64-10000", "the same parent at 6000 + 4000 steps", "tiny v2"),
    ("long64-10000-4g", "the same parent at 6000 + 4000 steps (not step-distilled)", "tiny v2"),
    ("ladd4-long64", "the 16-step spanning LADD from the long-64 px parent", "tiny v2"),
    ("ladd8-long64", "the 16-step spanning LADD from the long-64 px parent", "tiny v2"),
    ("ladd4-long64-200", "that LADD at step 200 of 300 (`--export-checkpoint 200`)", "tiny v2"),
    # Session 15: the same LADD on the parent's category weights (counting x2), then on the student's own path.
    ("ladd4-long64-c2", "that LADD with counting weighted 2, as the parent", "tiny v2"),
    ("ladd8-long64-c2", "that LADD with counting weighted 2, as the parent", "tiny v2"),
    ("ladd4-long64-c2-200", "that LADD at step 200 of 300", "tiny v2"),
    ("ladd4-long64-rollout", "that LADD with counting x2, trained on its own sampling path (`student_inputs: rollout`)",
     "tiny v2"),
    ("ladd8-long64-rollout", "that LADD with counting x2, trained on its own sampling path (`student_inputs: rollout`)",
     "tiny v2"),
    ("ladd4-long64-rollout-200", "the rollout LADD at step 200 of 300", "tiny v2"),
    # Session 16: the rollout LADD student sampled with guidance, and weight mixes (WiSE-FT) with its parent.
    ("ladd4g1.5-long64-rollout", "the rollout LADD student, sampled with guidance 1.5", "tiny v2"),
    ("ladd4g2-long64-rollout", "the rollout LADD student, sampled with guidance 2", "tiny v2"),
    ("wise4-rollout-0.75", "0.75 x the rollout LADD student + 0.25 x its parent (weights)", "tiny v2"),
    ("wise4-rollout-0.5", "0.5 x the rollout LADD student + 0.5 x its parent (weights)", "tiny v2"),
]
CATEGORIES = ("single", "two", "count", "position")


def table(folder: Path, rows: list[tuple[str, str, str]] = ROWS) -> str:
    lines = [
        "| model | decoder | steps | guidance | " + " | ".join(CATEGORIES)
        + " | **overall** | held-out | eval s/image (batch 50, 1 thread, shared CPU) |",
        "|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|",
    ]
    for name, label, decoder in rows:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        cells = [f"{100 * r['accuracy'][c]:.1f}" for c in CATEGORIES]
        per_image = r["seconds"] / (r["n"] + r["n_held_out"])
        lines.append(
            f"| {label} | {decoder} | {r['steps']} | {r['guidance_scale']:g} | " + " | ".join(cells)
            + f" | **{100 * r['overall']:.1f}** | {100 * r['held_out']['overall']:.1f} | {per_image:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shapes/eval")
    print(table(folder), "", "Trials:", "", table(folder, TRIALS), sep="\n")
