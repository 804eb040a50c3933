"""What differs between the tasks (one per image model, IDM): the models each needs besides Stable Diffusion 1.5 and
the video model, the components they add, the condition or mask each reads, its pipeline class, and how that
pipeline is called. Everything the tasks share (loading, running, writing) lives in the runner.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bivdiff import conditions
from bivdiff.config import RunConfig
from bivdiff.models_resolution import CATALOGUE, checkpoint_path, spec, vidrd_instructions

# The pipeline's from_pretrained reads SD-1.5's component list from model_index.json.
SD15_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "model_index.json")
ZEROSCOPE_PARTS = ("unet", "text_encoder", "tokenizer")
# Model.vdm -> (catalogue key, the VDM option naming its folder, the parts read); VidRD's folder is converted.
VIDEO_MODELS = {
    "ZeroScope": ("zeroscope", "ckpt_path", ZEROSCOPE_PARTS),
    "ModelScope": ("modelscope", "ckpt_path", ZEROSCOPE_PARTS),
    "AnimateDiff": ("animatediff", "motion_adapter_path", ("",)),
    "VidRD": ("vidrd", "diffusers_path", ("video_unet", "video_text_encoder", "video_tokenizer")),
}


@dataclass
class Inputs:
    """What the pipeline call reads besides the config: source frames, and a condition or mask video."""

    source: list[Image.Image]
    condition: list[Image.Image] | None = None
    condition_name: str | None = None  # the condition actually computed (names its file)
    condition_label: str | None = None  # its label in the comparison video
    mask: list[Image.Image] | None = None


class Task:
    """One image model's task; subclasses say what differs."""

    idm: str
    title: str
    pipeline_class_name: str
    unet_in_channels = 4  # the IDM's own UNet; when not 4, SD-1.5's UNet inverts frame by frame
    idm_model: str | None = None  # catalogue key of the IDM's own model (its UNet and sampler)

    def pipeline_class(self):
        """Imported on use, so listing and checking configs never pays for importing diffusers."""
        return getattr(importlib.import_module("bivdiff"), self.pipeline_class_name)

    def model_specs(self, config: RunConfig, root: Path) -> list:
        """The models a run of `config` reads, with their folders under the checkpoints `root`."""
        options = config.vdm_options
        key, option, parts = VIDEO_MODELS[config.vdm]
        local = checkpoint_path(options[option], root, CATALOGUE[key][1])
        how = None
        if key == "vidrd":
            checkpoint = checkpoint_path(options["ckpt_path"], root, "VidRD/ModelT2V.pth")
            sd21 = checkpoint_path(options["pretrained_model_path"], root, "stable-diffusion-2-1-base")
            how = vidrd_instructions(checkpoint, sd21, local)
        specs = [spec("sd15", SD15_PARTS, checkpoint_path(config.mixed_inversion["pretrained_model_path"], root,
                                                          CATALOGUE["sd15"][1])), spec(key, parts, local, how)]
        if config.vdm == "AnimateDiff" and options["pretrained_model_path"] is not None:
            base = checkpoint_path(options["pretrained_model_path"], root, "")
            specs.append(spec("animatediff-base", ZEROSCOPE_PARTS, base, f"a diffusers SD-1.5-family model in {base}"))
        return specs + self.idm_specs(config, root)

    def idm_specs(self, config: RunConfig, root: Path) -> list:
        if self.idm_model is None:
            return []
        local = checkpoint_path(config.idm_options["pretrained_model_path"], root, CATALOGUE[self.idm_model][1])
        return [spec(self.idm_model, ("unet", "scheduler"), local)]

    def components(self, config: RunConfig, load) -> dict:
        """Components besides SD-1.5's and the video model's; `load(key, subfolder, cls)` reads a resolved model.
        A task with its own UNet takes it from its model (its text encoder and VAE are SD-1.5's), and SD-1.5's
        UNet inverts frame by frame."""
        if self.idm_model is None:
            return {}
        from diffusers import UNet2DConditionModel

        unet = load(self.idm_model, "unet", UNet2DConditionModel)
        return {"unet": unet, "inversion_unet": load("sd15", "unet", UNet2DConditionModel)}

    def tiny_components(self, config: RunConfig) -> dict:
        return {}

    def inputs(self, config: RunConfig, source: list[Image.Image], read) -> Inputs:
        """The condition or mask, read (and so checked, with the environment) before any model loads;
        `read(dotted_key, as_mask)` reads the video a config key names with the run's frame selection."""
        return Inputs(source=source)

    def annotate(self, config: RunConfig, inputs: Inputs, models: dict) -> Inputs:
        """Conditions that need model weights (annotators), computed once the models are resolved."""
        return inputs

    def call_arguments(self, config: RunConfig, inputs: Inputs) -> dict:
        """The task's own keyword arguments of the pipeline call (the shared ones are added by the runner)."""
        prompt = config.model["idm_prompt"] + config.idm_options["prompt_suffix"]
        return dict(video=inputs.source, prompt=prompt)


class ControllableTask(Task):
    """ControlNet or T2I-Adapter on a condition video (canny, depth, pose)."""

    pipeline_class_name = "BIVDiffControllablePipeline"

    def __init__(self, idm: str, title: str, prefix: str, component: str):
        self.idm, self.title, self.prefix, self.component = idm, title, prefix, component

    def channels(self, config: RunConfig) -> int:
        return conditions.condition_channels(self.idm, config.idm_options["condition"])

    def uses_annotator(self, config: RunConfig) -> bool:
        options = config.idm_options
        return not config.tiny and options["condition_video"] is None and conditions.needs_annotator(
            options["condition"]
        )

    def idm_specs(self, config: RunConfig, root: Path) -> list:
        condition = config.idm_options["condition"]
        key = f"{self.prefix}-{condition}"
        specs = [spec(key, ("",), checkpoint_path(config.idm_options["pretrained_model_path"], root, CATALOGUE[key][1]))]
        if self.uses_annotator(config):
            specs.append(spec("annotators", conditions.ANNOTATOR_FILES[condition], root / CATALOGUE["annotators"][1]))
        return specs

    def components(self, config: RunConfig, load) -> dict:
        import diffusers

        other = {"controlnet": "adapter", "adapter": "controlnet"}[self.component]
        cls = getattr(diffusers, "ControlNetModel" if self.component == "controlnet" else "T2IAdapter")
        return {self.component: load(f"{self.prefix}-{config.idm_options['condition']}", "", cls), other: None}

    def tiny_components(self, config: RunConfig) -> dict:
        from bivdiff.tiny_models import tiny_adapter, tiny_controlnet

        if self.component == "controlnet":
            return {"controlnet": tiny_controlnet()}
        return {"adapter": tiny_adapter(in_channels=self.channels(config))}

    def inputs(self, config, source, read) -> Inputs:
        options, condition = config.idm_options, config.idm_options["condition"]
        if options["condition_video"] is not None:
            mode = "L" if self.channels(config) == 1 else "RGB"
            frames = [f.convert(mode) for f in read(f"IDM.{self.idm}.condition_video", False)]
            return Inputs(source, frames, condition, f"{condition} (given)")
        if self.uses_annotator(config):
            conditions.check_annotators_installed(condition, f"IDM.{self.idm}.condition")
            return Inputs(source, None, condition, condition)
        # Annotator weights are real downloads, so a tiny run stands canny edges in for depth and pose.
        low, high = options["canny_low_threshold"], options["canny_high_threshold"]
        label = "canny" if condition == "canny" else f"canny (tiny stand-in for {condition})"
        return Inputs(source, conditions.canny_frames(source, low, high, self.channels(config)), "canny", label)

    def annotate(self, config, inputs, models) -> Inputs:
        if inputs.condition is None:
            location = models["annotators"].location
            inputs.condition = conditions.annotate_frames(
                inputs.source, inputs.condition_name, location, self.channels(config)
            )
        return inputs

    def call_arguments(self, config, inputs) -> dict:
        arguments = super().call_arguments(config, inputs)
        del arguments["video"]
        scale = {f"{self.component}_conditioning_scale": config.idm_options["conditioning_scale"]}
        return dict(arguments, conditioning_frames=inputs.condition, num_frames=config.model["video_length"], **scale)


class InstructPix2PixTask(Task):
    idm = "InstructPix2Pix"
    title = "video editing by instruction (InstructPix2Pix)"
    pipeline_class_name = "BIVDiffInstructPix2PixPipeline"
    unet_in_channels = 8
    idm_model = "instruct-pix2pix"

    def call_arguments(self, config, inputs) -> dict:
        image_scale = config.idm_options["image_guidance_scale"]
        return dict(super().call_arguments(config, inputs), image_guidance_scale=image_scale)


class Prompt2PromptTask(Task):
    idm = "Prompt2Prompt"
    title = "video editing from a source prompt to an edited prompt (Prompt2Prompt)"
    pipeline_class_name = "BIVDiffPrompt2PromptPipeline"

    def call_arguments(self, config, inputs) -> dict:
        options = config.idm_options
        source_prompt, edited_prompt = (p + options["prompt_suffix"] for p in options["prompts"])
        same = ("cross_replace_steps", "self_replace_steps", "upcast_editing", "local_blend_threshold")
        return dict(
            video=inputs.source,
            source_prompt=source_prompt,
            prompt=edited_prompt,
            edit_type=options["controller_type"].removeprefix("Attention").lower(),
            reweight=dict(zip(options["reweight_words"], options["reweight_strengths"])) or None,
            edit_with_ddim=options["scheduler"] == "DDIM",
            local_blend_words=options["local_blend_words"] or None,
            **{key: options[key] for key in same},
        )


class InpaintTask(Task):
    """Stable Diffusion Inpainting with a mask video (inpainting) or band masks (outpainting)."""

    pipeline_class_name = "BIVDiffInpaintPipeline"
    unet_in_channels = 9
    idm_model = "sd-inpainting"

    def __init__(self, idm: str, title: str):
        self.idm, self.title = idm, title

    def inputs(self, config, source, read) -> Inputs:
        if self.idm == "StableDiffusionOutpainting":
            model, mask_type = config.model, config.idm_options["mask_type"]
            mask = conditions.outpainting_masks(len(source), model["height"], model["width"], mask_type)
            return Inputs(source=source, mask=mask, condition_label=f"mask ({mask_type})")
        mask = conditions.binarise_masks(read(f"IDM.{self.idm}.video_mask_path", True))
        return Inputs(source=source, mask=mask, condition_label="mask")

    def call_arguments(self, config, inputs) -> dict:
        outpaint = config.idm_options.get("mask_type")
        return dict(super().call_arguments(config, inputs), paste_back=config.idm_options["paste_back"],
                    **({"outpaint": outpaint} if outpaint else {"mask": inputs.mask}))


TASKS: dict[str, Task] = {
    "ControlNet": ControllableTask("ControlNet", "controllable video generation (ControlNet)", "controlnet",
                                   "controlnet"),
    "T2IAdapter": ControllableTask("T2IAdapter", "controllable video generation (T2I-Adapter)", "t2iadapter",
                                   "adapter"),
    "InstructPix2Pix": InstructPix2PixTask(),
    "Prompt2Prompt": Prompt2PromptTask(),
    "StableDiffusionInpainting": InpaintTask("StableDiffusionInpainting", "video inpainting (SD Inpainting)"),
    "StableDiffusionOutpainting": InpaintTask("StableDiffusionOutpainting", "video outpainting (SD Inpainting)"),
}


def task_for(config: RunConfig) -> Task:
    return TASKS[config.idm]
