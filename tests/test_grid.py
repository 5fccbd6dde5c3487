"""Grid files: expansion, ids, includes, and one clear line for every kind of mistake."""
import copy
import textwrap

import pytest
from click.testing import CliRunner

from ablate.cli import main
from ablate.grid import load_grid
from ablate.cell import cell_id, measurement_key
from ablate.settings import ConfigError
from conftest import run_cli


def write(tmp_path, text, name="grid.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


BASIC = """
name: basic
grid:
  model: [DiT-T/2, DiT-T/4]
  block: [adaln-zero, adaln, cross-attn, in-context]
  seed: [0, 1]
exclude:
  - {model: DiT-T/4, block: cross-attn}
base:
  data: {name: digits, image_size: 16}
  measure: [flops]
"""


def test_expansion_is_the_cartesian_product_minus_excluded(tmp_path):
    g = load_grid(write(tmp_path, BASIC))
    assert len(g.cells) == 2 * 4 * 2 - 2
    assert not any(c["model"] == "DiT-T/4" and c["block"] == "cross-attn" for c in g.cells)
    assert {c["seed"] for c in g.cells} == {0, 1}
    c = g.cells[0]
    assert (c["size"], c["patch_size"], c["input_size"]) == ("T", 2, 16)


def test_dotted_axes_lists_and_size_patch_spelling(tmp_path):
    g = load_grid(write(tmp_path, """
        grid:
          timing.batch_size: [4, 8]
          patch_size: [2, 4]
        base:
          size: T
          data: {name: digits, image_size: 16}
          measure: [timing]
          timing: {modes: [forward]}
        """))
    assert len(g.cells) == 4
    assert sorted({c["timing"]["batch_size"] for c in g.cells}) == [4, 8]
    assert {c["model"] for c in g.cells} == {"DiT-T/2", "DiT-T/4"}
    assert g.cells[0]["timing"]["modes"] == ["forward"]
    assert g.cells[0]["measure"] == ["flops", "timing"]  # timing needs flops (for MFU)


def test_ids_are_stable_and_depend_only_on_the_settings(tmp_path):
    a = load_grid(write(tmp_path, BASIC)).cells
    b = load_grid(write(tmp_path, BASIC)).cells
    assert [cell_id(c) for c in a] == [cell_id(c) for c in b]
    assert len({cell_id(c) for c in a}) == len(a)
    # The same cell spelled as size + patch_size is the same run; defaults written out too.
    g = load_grid(write(tmp_path, """
        base: {size: T, patch_size: 2, block: adaln-zero, seed: 0, learn_sigma: true,
               data: {name: digits, image_size: 16}, measure: [flops, timing]}
        """, "other.yaml"))
    same = [c for c in a if c["model"] == "DiT-T/2" and c["block"] == "adaln-zero" and c["seed"] == 0][0]
    # Adding a measurement changes the cell's id but not the key of the flops it shares.
    assert measurement_key(g.cells[0], "flops") == measurement_key(same, "flops")
    # flops do not depend on the seed: two seeds share one count.
    s1 = [c for c in a if c["model"] == "DiT-T/2" and c["block"] == "adaln-zero" and c["seed"] == 1][0]
    assert measurement_key(s1, "flops") == measurement_key(same, "flops")
    assert cell_id(s1) != cell_id(same)


def test_include_merges_base_files(tmp_path):
    write(tmp_path, """
        base:
          data: {name: digits, image_size: 16}
          measure: [flops]
          train: {steps: 7}
        grid: {block: [adaln, in-context]}
        """, "base.yaml")
    g = load_grid(write(tmp_path, """
        include: base.yaml
        name: child
        grid: {model: [DiT-T/4]}
        base: {measure: [flops, train], train: {batch_size: 4}}
        """))
    assert g.name == "child" and len(g.cells) == 2
    assert g.cells[0]["train"]["steps"] == 7 and g.cells[0]["train"]["batch_size"] == 4


def test_user_plugin_registers_a_block_usable_in_a_grid(tmp_path):
    (tmp_path / "myblocks.py").write_text(textwrap.dedent("""
        from ablate.models import register_block, BLOCKS
        from ablate.models.blocks import AdaLNZeroBlock
        if "my-block" not in BLOCKS:
            register_block("my-block", AdaLNZeroBlock)
        """))
    g = load_grid(write(tmp_path, """
        imports: [myblocks.py]
        base: {model: DiT-T/4, block: my-block, data: {name: digits, image_size: 16}}
        """))
    assert g.cells[0]["block"] == "my-block"


M = "model: DiT-T/4, data: {name: digits, image_size: 16}"
BAD = {
    "unknown block": (f"grid: {{block: [adaln-zer]}}\nbase: {{{M}}}", "grid.block", "did you mean 'adaln-zero'"),
    "unknown model": ("base: {model: DiT-XXL/2}", "base.model", "unknown model 'DiT-XXL/2'"),
    "unknown dataset": ("base: {model: DiT-T/4, data: {name: digts}}", "base.data.name", "did you mean 'digits'"),
    "patch does not divide": ("base: {model: DiT-T/8, data: {name: digits, image_size: 12}}",
                              "base.model", "8 does not divide the input size 12"),  # the patch size came from the model
    "wrong type": (f"base: {{{M}, seed: zero}}", "base.seed", "'zero' is not an integer"),
    "negative count": (f"base: {{{M}, measure: [train], train: {{steps: -5}}}}", "base.train.steps",
                       "-5 must be > 0"),
    "unknown setting typo": (f"base: {{{M}, trian: {{steps: 5}}}}", "base.trian", "did you mean 'train'"),
    "unknown nested key": (f"base: {{{M}, measure: [timing], timing: {{batchsize: 4}}}}",
                           "base.timing.batchsize", "did you mean 'batch_size'"),
    "unknown top-level key": (f"grids: {{block: [adaln]}}\nbase: {{{M}}}", "grids", "did you mean 'grid'"),
    "exclude names no axis": (f"grid: {{block: [adaln]}}\nexclude: [{{blok: adaln}}]\nbase: {{{M}}}",
                              "exclude[0].blok", "did you mean 'block'"),
    "empty axis": (f"grid: {{block: []}}\nbase: {{{M}}}", "grid.block", "at least one value"),
    "everything excluded": (f"grid: {{block: [adaln]}}\nexclude: [{{block: adaln}}]\nbase: {{{M}}}", "grid",
                            "every cell is excluded"),
    "invalid yaml": ("grid: {block: [adaln", "", "invalid YAML: line"),
    "unknown measurement": (f"base: {{{M}, measure: [flop]}}", "base.measure", "did you mean 'flops'"),
    "unknown dataset option": ("base: {model: DiT-T/4, data: {name: digits, imagesize: 8}}", "base.data.imagesize",
                               "did you mean 'image_size'"),
    "negative seed axis": (f"grid: {{seed: [0, -1]}}\nbase: {{{M}}}", "grid.seed", "-1 must be >= 0"),
    # A one-step respaced process cannot be built (its first posterior variance borrows the second's).
    "one sampling step": (f"base: {{{M}, measure: [fid], fid: {{sample_steps: 1}}}}", "base.fid.sample_steps",
                          "1 must be >= 2"),
    # Device strings torch would take (or take late): refused as the grid is read, never
    # run on the CPU instead or failing when the first key is computed.
    **{f"device {d}": (f"base: {{{M}, device: '{d}'}}", "base.device", f"{d!r} is not auto, cpu, cuda or cuda:N{hint}")
       for d, hint in (("cudafoo", " (did you mean 'cuda'?)"), ("cuda:x", " (did you mean 'cuda'?)"), ("meta", ""),
                       ("cpu:5", " (did you mean 'cpu'?)"), ("tpu", " (did you mean 'cpu'?)"), ("cuda:-1", ""),
                       ("CPU", ""))},
    "device axis": (f"grid: {{device: [cpu, meta]}}\nbase: {{{M}}}", "grid.device", "'meta' is not auto, cpu"),
    "one evaluation step": (f"base: {{{M}, measure: [train], train: {{sample_steps: 1, sampler: ddim}}}}",
                            "base.train.sample_steps", "1 must be >= 2"),
}

# The model's design choices: a did-you-mean from their registries, a type for the switches.
BAD.update({
    "unknown norm": (f"grid: {{norm: [layernorm, rmsnrom]}}\nbase: {{{M}}}", "grid.norm",
                     "unknown norm 'rmsnrom' (did you mean 'rmsnorm'?)"),
    "unknown mlp": (f"base: {{{M}, mlp: swiglo}}", "base.mlp", "unknown mlp 'swiglo' (did you mean 'swiglu'?)"),
    "unknown pos_embed": (f"base: {{{M}, pos_embed: rop}}", "base.pos_embed", "did you mean 'rope'"),
    "unknown block adaln-single": (f"base: {{{M}, block: adaln-singel}}", "base.block", "did you mean 'adaln-single'"),
    "qk_norm not a switch": (f"base: {{{M}, qk_norm: 'yes'}}", "base.qk_norm", "'yes' is not true or false"),
    "long_skips not a switch": (f"base: {{{M}, long_skips: 1}}", "base.long_skips", "1 is not true or false"),
})


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case, monkeypatch):
    body, key, fragment = BAD[case]
    path = write(tmp_path, "name: bad\n" + body + "\n")
    with pytest.raises(ConfigError) as e:
        load_grid(path)
    assert e.value.key == key and fragment in e.value.message
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(path), "--no-progress"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and fragment in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "results").exists()


def test_missing_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["validate", "nope.yaml"])
    assert result.exit_code == 2 and result.output.strip() == "error: nope.yaml: no such file"


def test_validate_reports_the_cells(tmp_path):
    result = CliRunner().invoke(main, ["validate", str(write(tmp_path, BASIC))])
    assert result.exit_code == 0 and "14 cells" in result.output


def test_adding_a_measurement_with_default_settings_keeps_the_cell_id(tmp_path):
    a = load_grid(write(tmp_path, "base: {model: DiT-T/4, data: {name: digits, image_size: 16}}", "a.yaml"))
    b = load_grid(write(tmp_path, "base: {model: DiT-T/4, data: {name: digits, image_size: 16}, "
                                  "measure: [flops, timing]}", "b.yaml"))
    c = load_grid(write(tmp_path, "base: {model: DiT-T/4, data: {name: digits, image_size: 16}, "
                                  "measure: [timing], timing: {batch_size: 4}}", "c.yaml"))
    assert cell_id(a.cells[0]) == cell_id(b.cells[0]) != cell_id(c.cells[0])


def test_a_setting_added_later_keeps_the_stored_keys_until_it_is_set(tmp_path):
    """A section field ``added_later`` (train.low_precision_residual, fid.numerics) enters the
    key only when set: a cell resolved before the field existed (its section without it) has
    the key of one with the field at its default, so stored results stay found."""
    base = "base: {model: DiT-T/4, data: {name: digits, image_size: 16}, measure: [timing, train, fid]"
    (cell,) = load_grid(write(tmp_path, base + "}", "a.yaml")).cells
    (lowres,) = load_grid(write(tmp_path, base + ", train: {low_precision_residual: true}}", "b.yaml")).cells
    (bf16,) = load_grid(write(tmp_path, base + ", fid: {numerics: bf16-true}}", "c.yaml")).cells
    old = copy.deepcopy(cell)
    for section, name in (("train", "low_precision_residual"), ("timing", "low_precision_residual"),
                          ("fid", "numerics")):
        assert name in cell[section]
        del old[section][name]
    keys = {m: measurement_key(cell, m) for m in ("timing", "train", "fid")}
    assert {m: measurement_key(old, m) for m in keys} == keys
    assert measurement_key(lowres, "train") != keys["train"] and measurement_key(lowres, "fid") != keys["fid"]
    assert measurement_key(lowres, "timing") == keys["timing"]  # train: is not timing's section
    assert measurement_key(bf16, "fid") != keys["fid"] and measurement_key(bf16, "train") == keys["train"]
    assert cell_id(old) == cell_id(cell) != cell_id(lowres)


def test_fid_numerics_read_under_its_old_name_keeps_the_stored_keys(tmp_path):
    """fid.numerics was written fid.precision: the old spelling is read with a one-line note,
    and either spelling gives the cell id and fid key that fid.precision gave (results are
    keyed on the field only where it is set, under the name they were stored with)."""
    base = "base: {model: DiT-T/4, data: {name: digits, image_size: 16}, measure: [fid], fid: "
    (old,) = load_grid(write(tmp_path, base + "{precision: bf16-true}}", "old.yaml")).cells
    (new,) = load_grid(write(tmp_path, base + "{numerics: bf16-true}}", "new.yaml")).cells
    assert old == new and old["fid"]["numerics"] == "bf16-true" and "precision" not in old["fid"]
    # The values fid.precision: bf16-true gave before the rename.
    assert (cell_id(new), measurement_key(new, "fid")) == ("a27ce158c39a", "fid-a4a4abde6508")
    with pytest.raises(ConfigError, match="fid.precision is now fid.numerics, which is set too"):
        load_grid(write(tmp_path, base + "{precision: fp32, numerics: bf16}}", "both.yaml"))
    with pytest.raises(ConfigError, match="did you mean 'bf16-true'"):
        load_grid(write(tmp_path, base + "{precision: bf16-tru}}", "typo.yaml"))


def test_the_old_spelling_is_noted_on_stderr_once(tmp_path):
    p = write(tmp_path, "base: {model: DiT-T/4, data: {name: digits, image_size: 16}, measure: [fid], "
                        "fid: {precision: fp32}}")
    r = run_cli("validate", p)
    assert r.returncode == 0 and r.stderr.splitlines() == ["note: fid.precision is now fid.numerics"], r.stderr


def test_one_and_one_point_zero_are_one_cell_and_flops_see_the_null_class(tmp_path):
    g = load_grid(write(tmp_path, "grid: {class_dropout_prob: [0, 0.0, 0.1]}\n"
                                  "base: {model: DiT-T/4, data: {name: digits, image_size: 16}}"))
    assert len(g.cells) == 2  # 0 and 0.0 are the same setting
    # The null-class row of the label table exists only with dropout: a different count.
    assert measurement_key(g.cells[0], "flops") != measurement_key(g.cells[1], "flops")


def test_non_text_setting_names_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="base.5: a setting name must be text"):
        load_grid(write(tmp_path, "base: {model: DiT-T/4, 5: x}"))


def test_the_model_choices_are_keyed_only_where_set(tmp_path):
    """norm, mlp, pos_embed, qk_norm and long_skips were added after results were stored: a cell
    that sets none of them has the id and the keys it had before they existed (the values
    below), with or without them in its resolved settings; each one set is another model."""
    base = "base: {model: DiT-T/4, data: {name: digits, image_size: 16}, measure: [flops, train, fid]"
    (cell,) = load_grid(write(tmp_path, base + "}", "a.yaml")).cells
    assert (cell["norm"], cell["mlp"], cell["pos_embed"], cell["qk_norm"], cell["long_skips"]) == (
        "layernorm", "gelu", "sincos", False, False)
    before = ("b74344584b27", {"flops": "flops-27c209182e59", "train": "train-6ac134949498", "fid": "fid-99cb5a1ded76"})
    keys = {m: measurement_key(cell, m) for m in before[1]}
    assert (cell_id(cell), keys) == before
    old = {k: v for k, v in cell.items() if k not in ("norm", "mlp", "pos_embed", "qk_norm", "long_skips")}
    assert (cell_id(old), {m: measurement_key(old, m) for m in keys}) == before
    (explicit,) = load_grid(write(tmp_path, base + ", norm: layernorm, mlp: gelu, pos_embed: sincos, qk_norm: false, "
                                                   "long_skips: false}", "b.yaml")).cells
    assert (cell_id(explicit), {m: measurement_key(explicit, m) for m in keys}) == before
    ids = {cell_id(cell)}
    for setting in ("norm: rmsnorm", "mlp: swiglu", "pos_embed: rope", "qk_norm: true", "long_skips: true",
                    "block: adaln-single"):
        (other,) = load_grid(write(tmp_path, base + f", {setting}}}", "c.yaml")).cells
        assert all(measurement_key(other, m) != keys[m] for m in keys), setting
        ids.add(cell_id(other))
    assert len(ids) == 7


def test_a_grid_over_the_model_choices_builds_those_models(tmp_path):
    from ablate.cell import Cell

    g = load_grid(write(tmp_path, "grid: {norm: [layernorm, rmsnorm], pos_embed: [sincos, rope]}\n"
                                  "base: {model: DiT-T/4, data: {name: digits, image_size: 16}, qk_norm: true, "
                                  "mlp: swiglu, long_skips: true}"))
    assert len(g.cells) == 4
    cell = Cell(g.cells[3], tmp_path / "w")
    kw = cell.model_kwargs
    assert (kw["norm"], kw["pos_embed"], kw["qk_norm"], kw["mlp"], kw["long_skips"]) == ("rmsnorm", "rope", True,
                                                                                         "swiglu", True)
    model = cell.build_model()
    assert model.pos_embed is None and len(model.skips) == 2 and model.blocks[0].attn.qk_norm


def test_rope_on_a_size_whose_head_dim_is_not_a_multiple_of_four_is_one_line(tmp_path):
    from ablate.models import SIZES, register_size

    if "H6" not in SIZES:
        register_size("H6", depth=2, hidden_size=24, num_heads=4, patch_sizes=(4,))  # head dim 6
    with pytest.raises(ConfigError, match="rope needs a head dim divisible by 4; DiT-H6/4 has 6") as e:
        load_grid(write(tmp_path, "base: {model: DiT-H6/4, pos_embed: rope, data: {name: digits, image_size: 16}}"))
    assert e.value.key == "base.pos_embed"
    assert len(load_grid(write(tmp_path, "base: {model: DiT-H6/4, data: {name: digits, image_size: 16}}",
                               "ok.yaml")).cells) == 1


def test_a_plugin_block_without_layers_refuses_a_layer_choice_in_one_line(tmp_path):
    (tmp_path / "oldblocks.py").write_text(textwrap.dedent("""
        from ablate.models import register_block, BLOCKS
        from ablate.models.blocks import AdaLNZeroBlock
        if "old-block" not in BLOCKS:
            @register_block("old-block")
            class OldBlock(AdaLNZeroBlock):
                def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
                    super().__init__(hidden_size, num_heads, mlp_ratio)
        """))
    base = "imports: [oldblocks.py]\nbase: {model: DiT-T/4, block: old-block, data: {name: digits, image_size: 16}"
    assert len(load_grid(write(tmp_path, base + ", long_skips: true}", "ok.yaml")).cells) == 1
    with pytest.raises(ConfigError, match=r"block 'old-block' builds its own layers .*, so it cannot take "
                                          r"mlp: swiglu$") as e:
        load_grid(write(tmp_path, base + ", mlp: swiglu}", "bad.yaml"))
    assert e.value.key == "base.block"


def test_a_cell_label_names_the_layer_choices_that_are_not_dits(tmp_path):
    from ablate.cell import label

    base = "base: {model: DiT-T/4, data: {name: digits, image_size: 16}"
    (plain,) = load_grid(write(tmp_path, base + "}", "a.yaml")).cells
    (rope,) = load_grid(write(tmp_path, base + ", pos_embed: rope, qk_norm: true}", "b.yaml")).cells
    assert label(plain) == "DiT-T/4 adaln-zero seed=0"
    assert label(rope) == "DiT-T/4 adaln-zero pos_embed=rope qk_norm=true seed=0"
