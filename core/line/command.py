"""``okng serve``: its options and its main loop (the parser is built by :mod:`core.cli`)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..errors import OkngError


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("serve", help="run the station without a window, triggered by a PLC (OPC UA, Modbus TCP), "
                                     "results to MQTT")
    v.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files; RecipeIndex 1..N in this order")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders, inspected in order, "
                                                                  "one per trigger, from the first again at the end")
    src.add_argument("--demo-stream", action="store_true", help="the built-in demo's stream of solar cells")
    src.add_argument("--watch", metavar="DIR", help="each trigger takes the next new image file in this folder")
    src.add_argument("--camera", metavar="N", help="each trigger takes the newest frame of camera N")
    src.add_argument("--video", metavar="FILE", help="each trigger takes the next frame of a video file")
    v.add_argument("--grab-timeout", type=float, default=5.0, metavar="S",
                   help="seconds a trigger waits for an image from --watch/--camera/--video (default 5)")
    v.add_argument("--opcua", metavar="[HOST:]PORT", help="serve the handshake as an OPC UA server (e.g. 4840)")
    v.add_argument("--modbus", metavar="[HOST:]PORT", help="serve the handshake as a Modbus TCP server (e.g. 502)")
    v.add_argument("--mqtt", metavar="HOST[:PORT]", help="publish every result to this MQTT broker")
    v.add_argument("--recipe-index", type=int, default=1, metavar="N", help="recipe to start with (default 1)")
    v.add_argument("--heartbeat", type=float, default=1.0, metavar="S", help="Heartbeat period (default 1 s)")
    v.add_argument("--operator", default="line", help="operator name in the results log (default 'line')")
    v.add_argument("--runtime", choices=["auto", "torch", "onnxruntime", "openvino"], default=None,
                   help="what runs the backbone (default: the fastest installed)")
    v.set_defaults(func=cmd_serve)


def _source(args: argparse.Namespace):
    from .sources import LiveGrab, Playlist

    if args.images or args.demo_stream:
        if args.demo_stream:
            from ..demo import demo_split

            paths = demo_split().stream_paths
        else:
            from ..imageio import iter_image_paths

            paths = [str(p) for p in iter_image_paths(args.images)]
            if not paths:
                raise OkngError(f"no images found in {' '.join(args.images)}")
        return Playlist(paths)
    from ..sources import FolderWatchSource, VideoSource

    live = FolderWatchSource(args.watch) if args.watch else VideoSource(args.camera if args.camera else args.video)
    return LiveGrab(live, args.grab_timeout)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import require

    require(*[m for m, on in (("asyncua", args.opcua), ("pymodbus", args.modbus), ("paho", args.mqtt)) if on])
    from pathlib import Path

    from .service import LineService, ServeOptions

    options = ServeOptions([Path(r) for r in args.recipes], _source(args), opcua=args.opcua, modbus=args.modbus,
                           mqtt=args.mqtt, recipe_index=args.recipe_index, heartbeat=args.heartbeat,
                           runtime=args.runtime, operator=args.operator)
    for warning in recipe_warnings(options.recipes):  # a typo is found now, not at a changeover mid-shift
        print(f"okng serve: warning: {warning}", file=sys.stderr)
    service = LineService(options)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.start()
        links = ", ".join(f"{d['protocol']} {d['endpoint']}" for d in service.status()["links"])
        mqtt = f", MQTT {args.mqtt}" if args.mqtt else ""
        print(f"okng serve: recipe {args.recipe_index} of {len(args.recipes)} loaded; {links}{mqtt}; ready",
              flush=True)
        stop.wait()
    finally:
        service.stop()
    st = service.status()
    print(f"okng serve: {serve_summary(st)}", file=sys.stderr)
    return 0


def serve_summary(status: dict) -> str:
    """The last line of ``okng serve``: cycles, triggers refused, and the other refusals apart
    (a recipe switch that failed was counted as a refused trigger)."""
    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    text = f"stopped after {n(status['cycles'], 'cycle')} ({n(status['refused'], 'trigger')} refused"
    if status.get("faults"):
        text += f"; {status['faults']} recipe switch(es) or acknowledgement(s) failed"
    return text + ")"


def recipe_warnings(paths) -> list[str]:
    """What would keep each RecipeIndex from loading, checked at start without loading a model:
    a file that is no recipe (a model file given by mistake), or a recipe without its model."""
    from pathlib import Path

    from ..recipes import load_recipe

    out = []
    for index, path in enumerate(paths, 1):
        try:
            recipe = load_recipe(path)
        except (OkngError, OSError, ValueError) as exc:
            out.append(f"recipe {index} ({path}) will not load: {exc}")
            continue
        if not recipe.model_path or not Path(recipe.model_path).is_file():
            out.append(f"recipe {index} ({path}) has no model file"
                       + (f" ({recipe.model_path} is missing)" if recipe.model_path else " (fit it first)"))
    return out
