"""The task registry: for each image model (IDM) of a config, which pipeline runs it, which models it needs, how
its components are built (real or tiny) and how the pipeline is called.

Pipeline classes are looked up in `bivdiff` by name when needed, so a task is enabled as soon as its class is
importable and the rest of the command line works without it.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bivdiff import conditions
from bivdiff.config import RunConfig
from bivdiff.models_resolution import (
    CATALOGUE,
    ModelSpec,
    Part,
    ResolvedModel,
    checkpoint_path,
    spec,
    vidrd_instructions,
)

SD15_PARTS = (
    Part("vae", "model"),
    Part("text_encoder", "model"),
    Part("tokenizer", "tokenizer"),
    Part("unet", "model"),
    Part("scheduler", "scheduler"),
)
ZEROSCOPE_PARTS = (Part("unet", "model"), Part("text_encoder", "model"), Part("tokenizer", "tokenizer"))
VIDRD_PARTS = (Part("video_unet", "model"), Part("video_text_encoder", "model"), Part("video_tokenizer", "tokenizer"))

SCHEDULER_CLASSES = {
    "DDIM": "DDIMScheduler",
    "PNDM": "PNDMScheduler",
    "EulerAncestral": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LMS": "LMSDiscreteScheduler",
}


@dataclass
class Inputs:
    """What the pipeline call reads besides the config: source frames, and a condition or mask video."""

    source: list[Image.Image]
    condition: list[Image.Image] | None = None
    condition_name: str | None = None  # the condition actually computed (names its file)
    condition_label: str | None = None  # its label in the comparison video
    mask: list[Image.Image] | None = None


@dataclass
class Outputs:
    """The pipeline's frames as PIL lists (one video each)."""

    frames: list[Image.Image]
    idm_frames: list[Image.Image] | None
    source_frames: list[Image.Image] | None = None


@dataclass
class Context:
    """What building components needs besides the config."""

    checkpoints: Path
    offline: bool
    cache_dir: str | None = None
    torch_dtype: object = None


# ----------------------------------------------------------------------------------------------------------
# Tiny components


def tiny_video_model(vdm: str) -> dict:
    """The tiny video-model side for `vdm`: VidRD gets a tiny VidRD UNet (in-block temporal attention, temporal
    convs), ZeroScope a ModelScope-shaped UNet3D; both with the tiny video text encoder."""
    from bivdiff.tiny_models import tiny_video_components, tiny_vidrd_unet

    if vdm not in ("VidRD", "ZeroScope"):
        raise ValueError(f"No tiny video model for {vdm!r}.")
    components = tiny_video_components(seed=0)
    if vdm == "VidRD":
        components["video_unet"] = tiny_vidrd_unet(seed=0)
    return components


def tiny_image_side(unet_in_channels: int = 4) -> dict:
    """Tiny SD-1.5 side; an 8- or 9-channel UNet (InstructPix2Pix, inpainting) gets a 4-channel inversion_unet."""
    from bivdiff.tiny_models import tiny_image_components, tiny_unet

    components = tiny_image_components(seed=0, unet_in_channels=unet_in_channels)
    if unet_in_channels != 4:
        components["inversion_unet"] = tiny_unet(4, seed=1)
    return components


# ----------------------------------------------------------------------------------------------------------
# Schedulers


def make_scheduler(name: str, config: dict):
    """The stage-1 sampler: `default` rebuilds the class the config names, any other name that class from it."""
    import diffusers

    class_name = config.get("_class_name", "DDIMScheduler") if name == "default" else SCHEDULER_CLASSES[name]
    return getattr(diffusers, class_name).from_config(config)


def inverse_scheduler(sd15_config: dict):
    from bivdiff.schedulers import BIVDiffDDIMInverseScheduler

    return BIVDiffDDIMInverseScheduler.from_config(sd15_config)


# ----------------------------------------------------------------------------------------------------------
# Tasks


class Task:
    """Shared behaviour; subclasses say what differs per image model."""

    idm: str
    title: str
    pipeline_class_name: str
    # The IDM's own UNet: a 4-channel SD-1.5 UNet unless the task replaces it (then SD-1.5's inverts).
    unet_in_channels = 4
    # The model whose scheduler config drives stage 1 when it is not SD-1.5's.
    scheduler_model: str | None = None

    def pipeline_class(self):
        """Imported on use, so listing and checking configs never pays for importing diffusers."""
        return getattr(importlib.import_module("bivdiff"), self.pipeline_class_name)

    def check_environment(self, config: RunConfig) -> None:
        """Raise a UserError for anything missing from the environment (e.g. an optional extra)."""

    # -------------------------------------------------------------- models
    def model_specs(self, config: RunConfig, root: Path) -> list[ModelSpec]:
        sd15 = checkpoint_path(config.mixed_inversion["pretrained_model_path"], root, "stable-diffusion-v1-5")
        return [spec("sd15", SD15_PARTS, sd15), *video_specs(config, root), *self.idm_specs(config, root)]

    def idm_specs(self, config: RunConfig, root: Path) -> list[ModelSpec]:
        return []

    def load_components(self, config: RunConfig, models: dict[str, ResolvedModel], ctx: Context) -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        sd15 = models["sd15"]
        load = _loader(ctx)
        sd15_scheduler = _scheduler_config(sd15, ctx)
        components = dict(
            vae=load(sd15, "vae", AutoencoderKL),
            text_encoder=load(sd15, "text_encoder", CLIPTextModel),
            tokenizer=load(sd15, "tokenizer", CLIPTokenizer, dtype=False),
            unet=load(sd15, "unet", UNet2DConditionModel),
            inverse_scheduler=inverse_scheduler(sd15_scheduler),
            **load_video_components(config, models, ctx),
        )
        scheduler_config = self.idm_scheduler_config(models, ctx)
        components["scheduler"] = make_scheduler(config.idm_options["scheduler"], scheduler_config)
        components.update(self.load_idm_components(config, models, ctx, components))
        return components

    def idm_scheduler_config(self, models: dict[str, ResolvedModel], ctx: Context) -> dict:
        """Stage 1's scheduler config. Smoothing derives its DDIM schedule from it, so SD-1.5's DDIM settings
        (no sample clipping, alphas_cumprod[0] as the final alpha) lie under the IDM's own keys: a sampler config
        without them (InstructPix2Pix's Euler) would otherwise give a DDIM with diffusers' defaults."""
        sd15 = _scheduler_config(models["sd15"], ctx)
        if self.scheduler_model is None:
            return sd15
        return {**sd15, **_scheduler_config(models[self.scheduler_model], ctx)}

    def load_idm_components(self, config, models, ctx, components) -> dict:
        return {}

    def tiny_components(self, config: RunConfig) -> dict:
        from bivdiff.tiny_models import sd15_scheduler_config

        components = {**tiny_image_side(self.unet_in_channels), **tiny_video_model(config.vdm)}
        components["scheduler"] = make_scheduler(config.idm_options["scheduler"], sd15_scheduler_config())
        components.update(self.tiny_idm_components(config))
        return components

    def tiny_idm_components(self, config: RunConfig) -> dict:
        return {}

    # -------------------------------------------------------------- inputs
    def prepare_inputs(self, config: RunConfig, source: list[Image.Image], models: dict[str, ResolvedModel]) -> Inputs:
        """Conditions and masks; runs after model resolution (annotators need their weights)."""
        return Inputs(source=source)

    def read_inputs(self, config: RunConfig) -> None:
        """Read (and so check) input videos other than the source before any model loads."""

    # -------------------------------------------------------------- call
    def call_arguments(self, config: RunConfig, inputs: Inputs) -> dict:
        """Task-specific arguments of the pipeline call."""
        raise NotImplementedError

    def common_arguments(self, config: RunConfig, generator) -> dict:
        model, options = config.model, config.idm_options
        suffix = options["prompt_suffix"]
        return dict(
            video_prompt=model["vdm_prompt"] + suffix,
            negative_prompt=options["negative_prompt"],
            mixing_ratio=float(options["mixing_ratio"]),
            num_inference_steps=model["num_inference_steps"],
            guidance_scale=float(model["guidance_scale"]),
            frame_batch_size=model["frame_batch_size"],
            generator=generator,
            output_type="pil",
        )

    def optional_arguments(self, config: RunConfig) -> dict:
        """Passed only where the pipeline's signature takes them."""
        model = config.model
        return dict(
            height=model["height"],
            width=model["width"],
            num_frames=model["video_length"],
            decode_chunk_size=model["decode_chunk_size"],
        )

    def arguments(self, pipe, config: RunConfig, inputs: Inputs, generator) -> dict:
        args = {**self.call_arguments(config, inputs), **self.common_arguments(config, generator)}
        accepted = inspect.signature(type(pipe).__call__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        for key, value in self.optional_arguments(config).items():
            if takes_any or key in accepted:
                args[key] = value
        return args

    def outputs(self, result) -> Outputs:
        idm_frames = getattr(result, "idm_frames", None)
        source_frames = getattr(result, "source_frames", None)
        return Outputs(
            frames=list(result.frames[0]),
            idm_frames=list(idm_frames[0]) if idm_frames is not None else None,
            source_frames=list(source_frames[0]) if source_frames is not None else None,
        )

    def idm_prompt(self, config: RunConfig) -> str:
        return config.model["idm_prompt"] + config.idm_options["prompt_suffix"]


class ControllableTask(Task):
    """ControlNet or T2I-Adapter on a condition video (canny, depth, pose)."""

    pipeline_class_name = "BIVDiffControllablePipeline"

    def __init__(self, idm: str, title: str, catalogue_prefix: str):
        self.idm, self.title, self.catalogue_prefix = idm, title, catalogue_prefix

    def condition(self, config: RunConfig) -> str:
        return config.idm_options["condition"]

    def channels(self, config: RunConfig) -> int:
        return conditions.condition_channels(self.idm, self.condition(config))

    def uses_annotator(self, config: RunConfig) -> bool:
        return (
            config.idm_options["condition_video"] is None
            and conditions.needs_annotator(self.condition(config))
            and not config.tiny
        )

    def check_environment(self, config: RunConfig) -> None:
        if self.uses_annotator(config):
            conditions.check_annotators_installed(self.condition(config), f"IDM.{self.idm}.condition")

    def idm_specs(self, config: RunConfig, root: Path) -> list[ModelSpec]:
        key = f"{self.catalogue_prefix}-{self.condition(config)}"
        local = checkpoint_path(config.idm_options["pretrained_model_path"], root, CATALOGUE[key].folder)
        specs = [spec(key, (Part("", "model"),), local)]
        if self.uses_annotator(config):
            files = tuple(Part(name, "file") for name in conditions.ANNOTATOR_FILES[self.condition(config)])
            specs.append(spec("annotators", files, root / CATALOGUE["annotators"].folder))
        return specs

    def load_idm_components(self, config, models, ctx, components) -> dict:
        from diffusers import ControlNetModel, T2IAdapter

        resolved = models[f"{self.catalogue_prefix}-{self.condition(config)}"]
        if self.idm == "ControlNet":
            return {"controlnet": _loader(ctx)(resolved, "", ControlNetModel)}
        return {"adapter": _loader(ctx)(resolved, "", T2IAdapter)}

    def tiny_idm_components(self, config: RunConfig) -> dict:
        from bivdiff.tiny_models import tiny_adapter, tiny_controlnet

        if self.idm == "ControlNet":
            return {"controlnet": tiny_controlnet()}
        return {"adapter": tiny_adapter(in_channels=self.channels(config))}

    def read_inputs(self, config: RunConfig) -> None:
        if config.idm_options["condition_video"] is not None:
            from bivdiff.inputs import read_condition_video

            read_condition_video(config, self.channels(config))

    def prepare_inputs(self, config, source, models) -> Inputs:
        from bivdiff.inputs import read_condition_video

        options, condition, channels = config.idm_options, self.condition(config), self.channels(config)
        name = condition
        if options["condition_video"] is not None:
            frames, label = read_condition_video(config, channels), f"{condition} (given)"
        elif conditions.needs_annotator(condition) and not config.tiny:
            frames = conditions.annotate_frames(source, condition, models["annotators"].location, channels)
            label = condition
        else:
            # Annotator weights are real downloads, so a tiny run stands canny edges in for depth and pose.
            frames = conditions.canny_frames(
                source, options["canny_low_threshold"], options["canny_high_threshold"], channels
            )
            name = "canny"
            label = "canny" if condition == "canny" else f"canny (tiny stand-in for {condition})"
        return Inputs(source=source, condition=frames, condition_name=name, condition_label=label)

    def call_arguments(self, config: RunConfig, inputs: Inputs) -> dict:
        scale = float(config.idm_options["conditioning_scale"])
        key = "controlnet_conditioning_scale" if self.idm == "ControlNet" else "adapter_conditioning_scale"
        return {"prompt": self.idm_prompt(config), "conditioning_frames": inputs.condition, key: scale}


class InstructPix2PixTask(Task):
    idm = "InstructPix2Pix"
    title = "video editing by instruction (InstructPix2Pix)"
    pipeline_class_name = "BIVDiffInstructPix2PixPipeline"
    unet_in_channels = 8
    scheduler_model = "instruct-pix2pix"

    def idm_specs(self, config, root) -> list[ModelSpec]:
        local = checkpoint_path(
            config.idm_options["pretrained_model_path"], root, "InstructPix2Pix/instruct-pix2pix"
        )
        return [spec("instruct-pix2pix", (Part("unet", "model"), Part("scheduler", "scheduler")), local)]

    def load_idm_components(self, config, models, ctx, components) -> dict:
        # InstructPix2Pix trained only its UNet (text encoder and VAE are SD-1.5's), so the rest comes from SD-1.5,
        # whose UNet inverts frame by frame.
        from diffusers import UNet2DConditionModel

        return {
            "inversion_unet": components["unet"],
            "unet": _loader(ctx)(models["instruct-pix2pix"], "unet", UNet2DConditionModel),
        }

    def call_arguments(self, config, inputs) -> dict:
        return dict(
            video=inputs.source,
            prompt=self.idm_prompt(config),
            image_guidance_scale=float(config.idm_options["image_guidance_scale"]),
        )


class Prompt2PromptTask(Task):
    idm = "Prompt2Prompt"
    title = "video editing from a source prompt to an edited prompt (Prompt2Prompt)"
    pipeline_class_name = "BIVDiffPrompt2PromptPipeline"

    def call_arguments(self, config, inputs) -> dict:
        options = config.idm_options
        suffix = options["prompt_suffix"]
        source_prompt, edited_prompt = options["prompts"]
        return dict(
            video=inputs.source,
            source_prompt=source_prompt + suffix,
            prompt=edited_prompt + suffix,
            edit_type="replace" if options["controller_type"] == "AttentionReplace" else "refine",
            cross_replace_steps=float(options["cross_replace_steps"]),
            self_replace_steps=float(options["self_replace_steps"]),
            local_blend_words=options["local_blend_words"] or None,
            local_blend_threshold=float(options["local_blend_threshold"]),
        )


class InpaintTask(Task):
    """Stable Diffusion Inpainting with a mask video (inpainting) or band masks (outpainting)."""

    pipeline_class_name = "BIVDiffInpaintPipeline"
    unet_in_channels = 9
    scheduler_model = "sd-inpainting"

    def __init__(self, idm: str, title: str):
        self.idm, self.title = idm, title

    @property
    def outpainting(self) -> bool:
        return self.idm == "StableDiffusionOutpainting"

    def idm_specs(self, config, root) -> list[ModelSpec]:
        local = checkpoint_path(
            config.idm_options["pretrained_model_path"],
            root,
            "StableDiffusionInpainting/stable-diffusion-inpainting",
        )
        return [spec("sd-inpainting", (Part("unet", "model"), Part("scheduler", "scheduler")), local)]

    def load_idm_components(self, config, models, ctx, components) -> dict:
        # The inpainting model shares SD-1.5's text encoder and VAE; SD-1.5's UNet inverts frame by frame.
        from diffusers import UNet2DConditionModel

        return {
            "inversion_unet": components["unet"],
            "unet": _loader(ctx)(models["sd-inpainting"], "unet", UNet2DConditionModel),
        }

    def read_inputs(self, config: RunConfig) -> None:
        if not self.outpainting:
            from bivdiff.inputs import read_mask

            read_mask(config)

    def prepare_inputs(self, config, source, models) -> Inputs:
        if self.outpainting:
            model, mask_type = config.model, config.idm_options["mask_type"]
            mask = conditions.outpainting_masks(len(source), model["height"], model["width"], mask_type)
            return Inputs(source=source, mask=mask, condition_label=f"mask ({mask_type})")
        from bivdiff.inputs import read_mask

        return Inputs(source=source, mask=conditions.binarise_masks(read_mask(config)), condition_label="mask")

    def call_arguments(self, config, inputs) -> dict:
        paste_back = bool(config.idm_options["paste_back"])
        args = dict(video=inputs.source, prompt=self.idm_prompt(config), paste_back=paste_back)
        if self.outpainting:
            args["outpaint"] = config.idm_options["mask_type"]
        else:
            args["mask"] = inputs.mask
        return args


TASKS: dict[str, Task] = {
    "ControlNet": ControllableTask("ControlNet", "controllable video generation (ControlNet)", "controlnet"),
    "T2IAdapter": ControllableTask("T2IAdapter", "controllable video generation (T2I-Adapter)", "t2iadapter"),
    "InstructPix2Pix": InstructPix2PixTask(),
    "Prompt2Prompt": Prompt2PromptTask(),
    "StableDiffusionInpainting": InpaintTask("StableDiffusionInpainting", "video inpainting (SD Inpainting)"),
    "StableDiffusionOutpainting": InpaintTask("StableDiffusionOutpainting", "video outpainting (SD Inpainting)"),
}


def task_for(config: RunConfig) -> Task:
    return TASKS[config.idm]


# ----------------------------------------------------------------------------------------------------------
# Video models


def video_specs(config: RunConfig, root: Path) -> list[ModelSpec]:
    options = config.vdm_options
    if config.vdm == "ZeroScope":
        local = checkpoint_path(options["ckpt_path"], root, "ZeroScope/zeroscope_v2_576w")
        return [spec("zeroscope", ZEROSCOPE_PARTS, local)]
    folder = checkpoint_path(options["diffusers_path"], root, "VidRD/diffusers")
    checkpoint = checkpoint_path(options["ckpt_path"], root, "VidRD/ModelT2V.pth")
    sd21 = checkpoint_path(options["pretrained_model_path"], root, "stable-diffusion-2-1-base")
    sd21_present = (sd21 / "tokenizer").is_dir() and (sd21 / "unet" / "config.json").is_file()
    return [spec("vidrd", VIDRD_PARTS, folder, vidrd_instructions(checkpoint, sd21, folder, sd21_present))]


def load_video_components(config: RunConfig, models: dict[str, ResolvedModel], ctx: Context) -> dict:
    from transformers import CLIPTextModel, CLIPTokenizer

    load = _loader(ctx)
    if config.vdm == "ZeroScope":
        from diffusers import UNet3DConditionModel

        zeroscope = models["zeroscope"]
        return dict(
            video_unet=load(zeroscope, "unet", UNet3DConditionModel),
            video_text_encoder=load(zeroscope, "text_encoder", CLIPTextModel),
            video_tokenizer=load(zeroscope, "tokenizer", CLIPTokenizer, dtype=False),
        )
    vidrd = models["vidrd"]
    return dict(
        video_unet=load(vidrd, "video_unet", importlib.import_module("bivdiff.models").VidRDUNet3DConditionModel),
        video_text_encoder=load(vidrd, "video_text_encoder", CLIPTextModel),
        video_tokenizer=load(vidrd, "video_tokenizer", CLIPTokenizer, dtype=False),
    )


def _loader(ctx: Context):
    from bivdiff.models_resolution import load_part

    def load(resolved: ResolvedModel, part: str, cls, dtype: bool = True):
        return load_part(
            resolved, part, cls, ctx.offline, torch_dtype=ctx.torch_dtype if dtype else None, cache_dir=ctx.cache_dir
        )

    return load


def _scheduler_config(resolved: ResolvedModel, ctx: Context) -> dict:
    from bivdiff.models_resolution import load_config_dict

    return load_config_dict(resolved, "scheduler", ctx.offline, ctx.cache_dir)
