# Sourced by scripts/gpu-session and scripts/gpu-trainings (with PY and OUT set): what a
# bare lent GPU machine needs before memsvc runs there. The Python packages its image
# lacks, carried as wheels in .gpu/whl, go to /tmp/gpu-site on PYTHONPATH; the corpus,
# carried as .gpu/corpus.tar.xz, is unpacked and named by MEMSVC_CORPUS_DIR; the card and
# torch are written to $OUT/gpu.txt.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-site .gpu/whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-site"
fi
if [ -f .gpu/corpus.tar.xz ]; then
    mkdir -p /tmp/gpu-corpus && tar -xJf .gpu/corpus.tar.xz -C /tmp/gpu-corpus
    export MEMSVC_CORPUS_DIR=/tmp/gpu-corpus/corpus
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 \
    | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$OUT/gpu.txt"
