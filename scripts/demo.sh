#!/usr/bin/env bash
# `make run`: Frisket's main job on the shipped tiny model. Starts frisket-server with models/
# on a free loopback port, asks it through the `frisket` client to change a reference image
# (examples/reference.png) to follow a prompt while a protected region (examples/protect.png)
# stays bit-exact, with Grad-SAM heatmaps and masks and a preview after every step, and
# prints where everything went. Usage: demo.sh SERVER_BIN CLIENT_BIN OUT_DIR
set -euo pipefail
server_bin=$1 client_bin=$2 out=$3
prompt=${FRISKET_DEMO_PROMPT:-a red circle on the right}
subject=${FRISKET_DEMO_SUBJECT:-circle}
mkdir -p "$out"
rm -rf "$out/demo"
"$server_bin" serve --models models --listen 127.0.0.1:0 >"$out/server.out" 2>"$out/server.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
addr=
for _ in $(seq 600); do
  addr=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$out/server.out" | head -1)
  [ -n "$addr" ] && break
  kill -0 $server 2>/dev/null || { cat "$out/server.log" >&2; echo "frisket-server did not start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "frisket-server did not start in 60 s; log: $out/server.log" >&2; exit 1; }
echo "frisket-server on $addr with models/shapes (log: $out/server.log)"
echo "prompt: \"$prompt\"; reference examples/reference.png; protected region examples/protect.png"
export FRISKET_SERVER=http://$addr
"$client_bin" generate --model shapes --prompt "$prompt" \
  --reference examples/reference.png --protect examples/protect.png --strength 0.9 \
  --seed 3 --steps 20 --guidance 5 --explain fast --subject "$subject" \
  --preview-every 1 --dump-dir "$out/demo" --out "$out/demo/result.png"
d=$out/demo
echo
echo "result:        $d/result.png"
echo "change map:    $d/change_map.png"
echo "previews:      $(ls "$d"/preview_*.png | wc -l) files, $d/preview_<step>.png"
echo "heatmaps:      $(ls -v "$d"/heatmap_*.png | grep -v '_mask\.png$' | tr '\n' ' ')"
echo "subject masks: $(ls -v "$d"/heatmap_*_mask.png | tr '\n' ' ')"
echo "masks:         $(ls -v "$d"/mask_*.png "$d"/protected_mask_*.png | tr '\n' ' ')"
echo "manifest:      $d/manifest.json"
