#!/usr/bin/env bash
# SQuAD-open with all-MiniLM-L6-v2 (the `[minilm]` extra) as retriever and reader, as run on the lent H100:
#   (a) retriever untrained (MiniLM as is, frozen), reader fine-tuned;
#   (b) ICT warm start, then full fine-tuning of query tower + reader (ORQA recipe, frozen doc index);
#   (c) the same with LoRA adapters (peft) instead of full fine-tuning.
# Usage: benchmarks/squad_open.sh <squad dev-v1.1.json> <results dir>
set -uo pipefail
SQUAD=${1:-../shared/data/squad_v1.1/dev-v1.1.json}
RESULTS=${2:-outputs/squad_open}
DATA=/tmp/squad_open_data
mkdir -p "$RESULTS"
python examples/prepare_squad_open.py --squad_path "$SQUAD" --output_dir $DATA > "$RESULTS/split.json"
COMMON="--corpus_file $DATA/corpus.jsonl --train_file $DATA/train.jsonl --eval_file $DATA/test.jsonl
  --bert_name_or_path ${BERT:-minilm} --reader_seq_len 320 --searcher_beam_size ${SEARCH:-50} --reader_beam_size 5
  --max_steps ${STEPS:-300} --per_device_train_batch_size 16 --max_eval_examples ${EVAL:-1500}
  --ict_batch_size 64 --ict_learning_rate 5e-5 ${BF16:---bf16 true} --disable_tqdm true --logging_steps 50"
run() {  # name, extra args
  local name=$1; shift
  timeout ${RUN_TIMEOUT:-200} python examples/finetune_openqa.py $COMMON --output_dir /tmp/squad_$name "$@" \
    > "$RESULTS/$name.log" 2>&1
  cp /tmp/squad_$name/all_results.json "$RESULTS/$name.json" 2>/dev/null
  echo "$name: $(python -c "import json;d=json.load(open('$RESULTS/$name.json'));print({k:round(v,4) for k,v in d.items() if k in ('eval_exact_match','eval_f1','eval_recall@5','eval_answer_recall@5','eval_closed_book_exact_match','ict_seconds','finetune_seconds')})" 2>/dev/null)"
}
run a_untrained_retriever --ict_steps 0 --train_retriever false --learning_rate 1e-4
run b_finetuned --ict_steps ${ICT:-200} --learning_rate 1e-4 --retriever_learning_rate 2e-5
run c_lora --ict_steps ${ICT:-200} --lora_r 16 --lora_alpha 32 --learning_rate 1e-3 --retriever_learning_rate 1e-3
