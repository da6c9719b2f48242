"""3D heads tab: photos of one person (uploaded, or an embedded synthetic head) -> My3DGen
personalization of the embedded heads prior, with a progress bar -> an orbit video of the first
photo's latent, an interpolation strip from the first photo's latent to the last one's, and the
adapter folder as a zip to download.

It runs what `genfast personalize --photos DIR` runs (`load_photos`, `prepare_photos` with align
"auto", `personalize`), with small step counts set through `PersonalizeConfig` and shown on the page.
Personalization adds adapters to the generator in place, so each job trains its own deep copy of
the prior (1.5M parameters) in its own fresh folder under `demo_dir()`. Training is CPU bound: the
tab runs one job at a time in its own queue, apart from the diffusion tabs' worker pipelines.
"""

from __future__ import annotations

import copy
import io
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from ..gan3d.photos import MIN_PHOTOS  # as `genfast personalize`
from .common import (
    Jobs,
    Tab,
    check_int,
    demo_dir,
    enlarge,
    fmt_seconds,
    to_pil,
    user_errors,
)

IDENTITY_SEED = 1  # seed 1 heads were never seen by the embedded prior (trained on seed 0)
IDENTITIES = tuple(f"synthetic head {i}" for i in range(5))
NO_IDENTITY = "none"
VIEWS, VIEW_SIZE, VIEW_YAW_MAX = 10, 256, 0.8  # as `genfast head-photos` renders them
MAX_PHOTOS = 20  # every training step renders every photo: more belong to `genfast personalize --photos`
# (low, high, default): the defaults make a run of about 40 s on a 2-core CPU (README, "Demo")
STEPS = (1, 300, 20)  # adapter training (the CLI's default is 300)
INVERT_STEPS = (1, 300, 10)  # latent inversion (CLI: 150)
CAMERA_STEPS = (1, 100, 5)  # camera fitting (CLI: 40)
ORBIT_FRAMES, ORBIT_FPS, SCALE = 24, 12, 4
STRIP_FRAMES = 6
PHASES = {"cameras": "fitting cameras", "latents": "inverting photos", "adapters": "training adapters"}


def _upload_paths(files) -> list[Path]:
    """Gradio hands uploads as paths (str), FileData-like objects or dicts; a single upload may come bare."""
    if files is None:
        return []
    if not isinstance(files, list | tuple):
        files = [files]
    paths = []
    for f in files:
        path = f.get("path") if isinstance(f, dict) else getattr(f, "path", None) or getattr(f, "name", f)
        paths.append(Path(path))
    return paths


def _copy_uploads(paths: list[Path], folder: Path) -> None:
    """Copy the uploads into `folder` under their own names (a clash gets a suffix); each must read as an image."""
    from ..gan3d.photos import IMAGE_EXTENSIONS, load_photo

    folder.mkdir()
    for path in paths:
        name = path.name
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise gr.Error(f"{name} is not an image file: upload photos ending in {', '.join(IMAGE_EXTENSIONS)}, "
                           f"or remove {name}.")
        if not path.is_file():
            raise gr.Error(f"The upload {name} did not arrive: upload it again.")
        dest, k = folder / name, 1
        while dest.exists():
            k += 1
            dest = folder / f"{path.stem}-{k}{path.suffix}"
        shutil.copyfile(path, dest)
        try:
            load_photo(dest, 16)  # decodes the whole file: a truncated or renamed file fails here, named
        except ValueError as err:
            cause = str(err.__cause__ or err).replace(str(dest), name)  # the user knows the file by its name
            raise gr.Error(f"Cannot read {name} as an image ({cause}): remove it or upload it again as a PNG or "
                           f"JPEG.") from None


def _identity_views(index: int):
    """(uint8 views (VIEWS, S, S, 3), their true cameras): held-out head `index`, as `genfast head-photos` draws it."""
    from ..data.heads import render_head, sample_identity
    from ..gan3d.cameras import ffhq_intrinsics, sample_cameras

    g = torch.Generator().manual_seed(IDENTITY_SEED * 1_000_003 + index)
    cams = sample_cameras(VIEWS, g, yaw_max=VIEW_YAW_MAX, intrinsics=ffhq_intrinsics())
    images = render_head(sample_identity(IDENTITY_SEED, index), cams, VIEW_SIZE)
    return (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy(), cams.float()


def _render(G, ws, cams) -> torch.Tensor:
    """G's images for (ws, cams) in [0, 1], through uint8 as a saved PNG holds them."""
    with torch.no_grad():
        image = G.synthesis(ws, cams, deterministic=True)["image"]
    return ((image.clamp(-1, 1) + 1) * 127.5).round() / 255


def _strip(G, ws) -> Image.Image:
    """STRIP_FRAMES frontal renders along the straight line in W from ws[0] to ws[-1] (as `genfast interpolate`)."""
    from ..gan3d.cameras import frontal_camera

    t = torch.linspace(0, 1, STRIP_FRAMES, device=ws.device)
    w = torch.lerp(ws[:1], ws[-1:], t[:, None, None])
    cams = frontal_camera().float().to(ws.device)[None].expand(len(t), -1)
    frames = [enlarge(to_pil(x), G.img_resolution * SCALE) for x in _render(G, w, cams)]
    strip = Image.new("RGB", (sum(f.width for f in frames), frames[0].height))
    for i, f in enumerate(frames):
        strip.paste(f, (i * f.width, 0))
    return strip


def _orbit(G, ws, folder: Path) -> Path:
    """The orbit of ws[0] as MP4 (H.264 via imageio-ffmpeg); GIF when no MP4 encoder works here."""
    from ..gan3d.video import render_orbit, write_video

    frames = render_orbit(G, ws[:1], frames=ORBIT_FRAMES, progress=False)
    try:
        return write_video(frames, folder / "orbit.mp4", fps=ORBIT_FPS, scale=SCALE)
    except (ImportError, OSError, RuntimeError):
        return write_video(frames, folder / "orbit.gif", fps=ORBIT_FPS, scale=SCALE)


def numbers_table(n: dict) -> str:
    before, after, cfg = n["reconstruction"]["inversion_only"], n["reconstruction"]["personalized"], n["config"]
    return "\n".join([
        "| | |", "|---|---|",
        f"| photos | {n['photos']} ({n['source']}; {n['alignment']}) |",
        (f"| trained parameters | {n['trained_parameters']:,} ({n['trained_percent']:.2f}% of "
         f"{n['generator_parameters']:,}) |"),
        (f"| steps: cameras / inversion / adapters | {cfg['camera_steps']} / {cfg['invert_steps']} / {cfg['steps']} "
         f"(symmetry {'on' if cfg['symmetry'] else 'off'}) |"),
        f"| time | {n['minutes']:.2f} min personalizing, {fmt_seconds(n['seconds'])} in all |",
        f"| PSNR / SSIM to the photos, inversion only | {before['psnr']:.2f} dB / {before['ssim']:.3f} |",
        f"| PSNR / SSIM to the photos, personalized | {after['psnr']:.2f} dB / {after['ssim']:.3f} |",
    ])


class HeadsTab(Tab):
    TAB = "heads"

    def prior(self):
        """The embedded heads prior, loaded once and never trained: jobs train a deep copy."""
        from ..models import load_heads_prior

        return self.models.shared("heads", lambda: load_heads_prior()[0].to(self.models.device))

    def identity_encoder(self):
        from ..gan3d.identity import load_identity_encoder

        return self.models.shared("heads-identity", lambda: load_identity_encoder().to(self.models.device))

    @user_errors
    def run(self, photos, identity, steps, invert_steps, camera_steps, symmetry, request: gr.Request = None,
            progress=gr.Progress()):  # noqa: B008 -- Gradio injects the progress tracker through this default
        """(orbit video path, interpolation strip, adapter zip path, numbers markdown, numbers, photo crops)."""
        t0 = time.perf_counter()
        paths = _upload_paths(photos)
        identity = identity or NO_IDENTITY
        if identity != NO_IDENTITY and identity not in IDENTITIES:
            raise gr.Error(f"Unknown identity {identity!r}: pick one of {', '.join(IDENTITIES)}, or '{NO_IDENTITY}'.")
        if not paths and identity == NO_IDENTITY:
            raise gr.Error(f"Upload photos of one person (at least {MIN_PHOTOS}; My3DGen uses about 10), or pick an "
                           f"embedded identity.")
        if paths and identity != NO_IDENTITY:
            raise gr.Error(f"You uploaded {len(paths)} photo(s) and picked the identity {identity!r}: clear the photos "
                           f"or set the identity to '{NO_IDENTITY}'.")
        if paths and not MIN_PHOTOS <= len(paths) <= MAX_PHOTOS:
            raise gr.Error(f"Upload at least {MIN_PHOTOS} photos of the person (got {len(paths)}); My3DGen uses about "
                           f"10." if len(paths) < MIN_PHOTOS else
                           f"The demo takes at most {MAX_PHOTOS} photos (got {len(paths)}): every training step "
                           f"renders all of them. Pick the best {MAX_PHOTOS}, or run `genfast personalize --photos` "
                           f"for more.")
        steps = check_int("Adapter training steps", steps, *STEPS[:2])
        invert_steps = check_int("Inversion steps", invert_steps, *INVERT_STEPS[:2])
        camera_steps = check_int("Camera fitting steps", camera_steps, *CAMERA_STEPS[:2])
        if not isinstance(symmetry, bool):
            raise gr.Error(f"Symmetry must be on or off (true/false), got {symmetry!r}.")

        from ..training.personalize import PersonalizeConfig

        cfg = PersonalizeConfig(steps=steps, invert_steps=invert_steps, camera_steps=camera_steps, symmetry=symmetry)
        flag = self.jobs.start(request, self.TAB)
        job = Path(tempfile.mkdtemp(prefix="heads-", dir=demo_dir()))  # fresh and unique: nothing is overwritten
        try:
            return self._job(job, paths, identity, cfg, flag, progress, t0)
        except BaseException:
            shutil.rmtree(job, ignore_errors=True)  # an unfinished job leaves nothing behind (the demo never resumes)
            raise

    def _job(self, job: Path, paths, identity, cfg, flag, progress, t0):
        from safetensors.torch import load_file

        from ..data.faces import prepare_photos
        from ..eval.faithfulness import faithfulness
        from ..gan3d.adapter import CAMERAS, LATENTS
        from ..gan3d.photos import load_photos, read_cameras
        from ..training.personalize import personalize

        folder = job / "photos"
        if paths:
            progress(None, desc="reading photos")
            _copy_uploads(paths, folder)
            source = "uploaded"
        else:
            progress(None, desc=f"rendering {identity}")
            index = IDENTITIES.index(identity)
            views, _ = self.models.shared(f"heads-views-{index}", lambda: _identity_views(index))
            folder.mkdir()
            for i, view in enumerate(views):
                Image.fromarray(np.ascontiguousarray(view)).save(folder / f"{i:02d}.png")
            source = f"{identity}, seed {IDENTITY_SEED}, held out from the prior's training"
        Jobs.check(flag)
        prior = self.prior()
        G = copy.deepcopy(prior)  # adapters go on the copy: the shared prior stays clean for other jobs
        names, centre_crops = load_photos(folder, resolution=G.img_resolution, max_photos=MAX_PHOTOS)
        progress(None, desc="aligning photos")
        try:
            prepared = prepare_photos(folder, names, centre_crops, G.img_resolution, "auto")
        except ValueError as err:  # e.g. no face in a photo: name it as the user knows it, not by the job's path
            raise gr.Error(str(err).replace(f"{folder}/", "")) from None
        Jobs.check(flag)

        def on_step(phase: str, step: int, total: int) -> None:
            Jobs.check(flag)  # Cancel stops the job within one step
            progress((step, total), desc=PHASES[phase], unit="steps")

        adapter = job / "adapter"
        summary = personalize(G, names, prepared.images, adapter, cfg, identity=self.identity_encoder(),
                              progress=False, log=lambda *_: None, camera_init=prepared.init,
                              alignment=prepared.record, crops_png=prepared.sheet, on_step=on_step)
        progress(None, desc="rendering the orbit and the strip")
        device = self.models.device
        ws = load_file(str(adapter / LATENTS))["ws"].to(device)
        cams = read_cameras(adapter / CAMERAS, names).to(device)
        targets = prepared.images.to(device)
        # the latents were inverted on the frozen prior: its renders are the fit before the adapters
        before = faithfulness(_render(prior, ws, cams), targets)
        after = faithfulness(_render(G, ws, cams), targets)
        Jobs.check(flag)
        video = _orbit(G, ws, job)
        strip = _strip(G, ws)
        strip.save(job / "interpolation.png")
        archive = Path(shutil.make_archive(str(job / "heads-adapter"), "zip", root_dir=job, base_dir=adapter.name))
        # the person's photos and the unzipped adapter are no longer needed: keep only what the page offers
        shutil.rmtree(folder)
        shutil.rmtree(adapter)
        trained, total = summary["trainable_parameters"], summary["generator_parameters"]
        numbers = {
            "photos": len(names), "photo_names": names, "source": source,
            "alignment": prepared.note or prepared.record.get("align", "none"),
            "trained_parameters": trained, "generator_parameters": total, "trained_percent": 100 * trained / total,
            "minutes": summary["minutes"], "seconds": time.perf_counter() - t0,
            "reconstruction": {"inversion_only": before, "personalized": after},
            "perceptual": summary["perceptual"], "identity_network": summary["identity"],
            "config": summary["config"],
        }
        crops = Image.open(io.BytesIO(prepared.sheet)).convert("RGB")
        return str(video), strip, str(archive), numbers_table(numbers), numbers, crops

    def build(self) -> None:
        t = self.TAB
        with gr.Row():
            with gr.Column(scale=1):
                photos = gr.File(label=f"Photos of one person ({MIN_PHOTOS} to {MAX_PHOTOS}; My3DGen uses about 10)",
                                 file_count="multiple", file_types=["image"], elem_id=f"{t}-photos")
                identity = gr.Dropdown([NO_IDENTITY, *IDENTITIES], value=NO_IDENTITY, elem_id=f"{t}-identity",
                                       label=f"... or an embedded identity ({VIEWS} rendered views of a synthetic "
                                             f"head the prior never saw)")
                steps = gr.Slider(*STEPS[:2], value=STEPS[2], step=1, elem_id=f"{t}-steps",
                                  label="Adapter training steps (the CLI's default: 300)")
                symmetry = gr.Checkbox(value=True, label="Symmetry regulariser", elem_id=f"{t}-symmetry")
                with gr.Accordion("Fitting steps", open=False):
                    invert_steps = gr.Slider(*INVERT_STEPS[:2], value=INVERT_STEPS[2], step=1,
                                             elem_id=f"{t}-invert-steps", label="Latent inversion steps (CLI: 150)")
                    camera_steps = gr.Slider(*CAMERA_STEPS[:2], value=CAMERA_STEPS[2], step=1,
                                             elem_id=f"{t}-camera-steps", label="Camera fitting steps (CLI: 40)")
                run, stop = self.buttons("Personalize")
            with gr.Column(scale=2):
                with gr.Row():
                    video = gr.Video(label="Orbit", elem_id=f"{t}-orbit", autoplay=True, loop=True)
                    crops = gr.Image(label="The photos as fitted", elem_id=f"{t}-crops", format="png")
                strip = gr.Image(label="Interpolation: first photo's latent to the last one's", elem_id=f"{t}-strip",
                                 format="png", buttons=["download"])
                adapter = gr.File(label="Adapter (zip; `genfast interpolate --adapter` takes the folder)",
                                  elem_id=f"{t}-adapter")
                table, raw = self.numbers()
        # CPU-bound training: one job at a time, and it takes no worker pipeline
        self.wire(run, stop, [photos, identity, steps, invert_steps, camera_steps, symmetry],
                  [video, strip, adapter, table, raw, crops], concurrency_id=t, concurrency_limit=1)
