# The metal-defect app (Streamlit) on CPU TensorFlow. Build: docker build -t metal-defect .
# Run:   docker run -p 8501:8501 metal-defect
#        docker run -p 8501:8501 -v "$PWD/model_bundle:/app/model_bundle:ro" metal-defect
FROM python:3.11-slim

# Source, revision, version and creation time are added by the CI workflow (docker/metadata-action).
LABEL org.opencontainers.image.title="metal-defect" \
      org.opencontainers.image.description="Check steel surface images for defects: verdicts with confidence, out-of-distribution flags and heatmaps"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8501 \
    METAL_DEFECT_HOME=/app \
    METAL_DEFECT_APP=/app/st_app_predict.py \
    METAL_DEFECT_BUNDLE=/app/model_bundle \
    TF_CPP_MIN_LOG_LEVEL=3

WORKDIR /app
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

# What serving imports, first: this layer is rebuilt only when requirements-serve.txt changes
# (training, evaluation and tuning packages stay out of the image: requirements.txt adds them).
COPY requirements-serve.txt ./
RUN pip install --no-cache-dir -r requirements-serve.txt

# The package; setup.py reads both requirement files and installs the three YAML files beside it.
COPY setup.py pyproject.toml README.md requirements.txt params.yaml schema.yaml ./
COPY config ./config
COPY src ./src
RUN pip install --no-cache-dir --no-deps . && rm -rf build src

COPY st_app_predict.py ./
COPY .streamlit ./.streamlit
# An exported bundle, when one was put here before the build (see model_bundle/README.md).
COPY model_bundle ./model_bundle
# artifacts/review exists in the image so that a named volume mounted there starts owned by the app user
RUN mkdir -p artifacts/review logs && chown -R app:app artifacts logs

USER 10001
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8501') + '/_stcore/health', timeout=4)"]
CMD ["python", "-m", "metal_defect.launch_app"]
