#!/usr/bin/env bash
# Start a built metal-defect image and check it as a deployment would, before anyone uses it:
# it turns healthy by its own HEALTHCHECK, does not run as root, and, when the image or a mount
# holds a bundle at /app/model_bundle, answers one image through its installed predictor.
# The container is left running (the caller removes it); every failed step exits non-zero.
#
#   .ci/image_smoke.sh ENGINE IMAGE NAME [RUN OPTIONS...]   # ENGINE: docker (GitHub) or podman (.ci/container_check.sh)
set -euo pipefail
engine="$1" image="$2" name="$3"
shift 3
fail() { echo "image check FAILED ($name): $*" >&2; "$engine" logs "$name" 2>&1 | tail -30 >&2 || true; exit 1; }

# a container left under this name by a killed run would refuse the new one: replace it
"$engine" rm -f "$name" > /dev/null 2>&1 || true
# (podman says twice that it has no systemd to time the health checks: healthy() below runs them)
"$engine" run -d --name "$name" "$@" "$image" 2> >(grep -v "systemd connection" >&2) > /dev/null
healthy() {  # podman without systemd runs no health timers: ask it to run the image's check now
  if [ "$engine" = podman ]; then
    podman healthcheck run "$name" > /dev/null 2>&1
  else
    [ "$(docker inspect --format '{{.State.Health.Status}}' "$name")" = healthy ]
  fi
}
deadline=$((SECONDS + 240))  # TensorFlow's import and Streamlit's start take ~20 s; docker's first check runs after 30 s
until healthy; do
  [ "$("$engine" inspect --format '{{.State.Running}}' "$name")" = true ] || fail "the container exited"
  [ $SECONDS -lt $deadline ] || fail "not healthy after 240 s"
  sleep 2
done
uid="$("$engine" exec "$name" id -u)"
[ "$uid" != 0 ] || fail "runs as root"
echo "image check ($name): healthy, uid $uid"

answer="$(mktemp)"
trap 'rm -f "$answer"' EXIT
if "$engine" exec "$name" test -f /app/model_bundle/serving.json; then
  # a picture made inside the container, answered by the image's own command line and bundle
  "$engine" exec "$name" sh -c 'cd /tmp && python -c "from PIL import Image; Image.radial_gradient(\"L\").resize((200, 200)).save(\"probe.png\")" \
    && metal-defect predict probe.png --model /app/model_bundle --csv answer.csv > /dev/null && cat answer.csv' > "$answer" \
    || fail "metal-defect predict inside the image"
  [ "$(wc -l < "$answer")" -ge 2 ] && ! grep -q "unreadable" "$answer" || fail "no answer: $(cat "$answer")"
  echo "image check ($name): the bundle answers: $(sed -n 2p "$answer" | cut -c1-120)"
else
  echo "image check ($name): no bundle in the image or mounted: the app shows its empty state"
fi
