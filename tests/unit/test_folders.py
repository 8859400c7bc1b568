"""scan_folder, read_manifest and load_image_set over real little folders and CSV files written in tmp_path."""

from __future__ import annotations

import os
import warnings

import pytest
from PIL import Image

from finegrain.data.folders import ImageSet, Sample, load_image_set, read_manifest, scan_folder
from finegrain.errors import FinegrainError


def put(root, *relpaths: str) -> None:
    """Write each file: a real 4x4 image for an image extension, a line of text otherwise."""
    for rel in relpaths:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ext = os.path.splitext(rel)[1].lower()
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}.get(ext)
        if fmt:
            Image.new("RGB", (4, 4), (10, 120, 200)).save(path, fmt)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write("not an image\n")


def rel_paths(image_set: ImageSet, root) -> list[str]:
    return [os.path.relpath(s.path, root).replace(os.sep, "/") for s in image_set.samples]


def write_csv(path, text: str) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


# --- ImageFolder layouts ---


def test_flat_layout_is_split_all_with_sorted_classes(tmp_path):
    put(tmp_path, "zebra/1.jpg", "zebra/2.jpg", "Apple/1.png", "mango/1.jpg", "mango/2.jpg", "mango/3.jpg")
    s = scan_folder(str(tmp_path))
    assert s.classes == ["Apple", "mango", "zebra"]
    assert s.splits == ["all"]
    assert {x.split for x in s.samples} == {"all"}
    assert s.counts() == [1, 3, 2]
    assert s.root == os.path.abspath(tmp_path)
    assert all(os.path.isabs(x.path) and os.path.isfile(x.path) for x in s.samples)
    labelled = {(os.path.basename(os.path.dirname(x.path)), s.classes[x.label]) for x in s.samples}
    assert all(folder == cls for folder, cls in labelled)
    assert s.warnings == []


def test_split_layout_shares_one_class_index(tmp_path):
    put(tmp_path, "train/b/1.jpg", "train/b/2.jpg", "train/a/1.jpg", "val/a/1.jpg", "val/c/1.jpg", "test/b/1.jpg")
    s = scan_folder(str(tmp_path))
    assert s.classes == ["a", "b", "c"]  # c exists only in val, yet has one index everywhere
    assert s.splits == ["train", "val", "test"]
    assert s.counts("train") == [1, 2, 0]
    assert s.counts("val") == [1, 0, 1]
    assert s.counts("test") == [0, 1, 0]
    assert s.counts() == [2, 3, 1]
    val = s.split("val")
    assert [(s.classes[x.label], os.path.basename(x.path)) for x in val] == [("a", "1.jpg"), ("c", "1.jpg")]
    assert all(isinstance(x, Sample) and x.split == "val" for x in val)
    assert s.warnings == []  # a class missing from a split is normal, not an empty folder


def test_split_layout_ignores_other_top_level_folders(tmp_path):
    put(tmp_path, "train/a/1.jpg", "val/a/1.jpg", "notes/readme.txt")
    s = scan_folder(str(tmp_path))
    assert s.classes == ["a"]
    assert s.splits == ["train", "val"]


def test_nested_subfolders_belong_to_their_class(tmp_path):
    put(tmp_path, "a/1.jpg", "a/day1/2.jpg", "a/day1/deeper/3.png", "b/x/4.jpg")
    s = scan_folder(str(tmp_path))
    assert s.classes == ["a", "b"]  # subfolders of a class are not classes
    assert rel_paths(s, tmp_path) == ["a/1.jpg", "a/day1/2.jpg", "a/day1/deeper/3.png", "b/x/4.jpg"]
    assert [x.label for x in s.samples] == [0, 0, 0, 1]


def test_only_image_extensions_any_case(tmp_path):
    put(tmp_path, "a/1.JPG", "a/2.jpeg", "a/3.Png", "a/4.bmp", "a/5.webp")
    put(tmp_path, "a/notes.txt", "a/meta.json", "a/clip.mp4", "a/img.jpg.xmp", "a/Thumbs.db", "a/noext")
    s = scan_folder(str(tmp_path))
    assert rel_paths(s, tmp_path) == ["a/1.JPG", "a/2.jpeg", "a/3.Png", "a/4.bmp", "a/5.webp"]


def test_hidden_files_and_folders_ignored(tmp_path):
    put(tmp_path, "a/1.jpg", "a/.hidden.jpg", "a/._1.jpg", "a/.DS_Store")
    put(tmp_path, "a/.ipynb_checkpoints/1-checkpoint.jpg", ".cache/x/1.jpg", "b/.thumbs/1.jpg", "b/2.jpg")
    s = scan_folder(str(tmp_path))
    assert s.classes == ["a", "b"]  # .cache is not a class
    assert rel_paths(s, tmp_path) == ["a/1.jpg", "b/2.jpg"]


def test_empty_class_folder_warns_and_is_noted(tmp_path):
    put(tmp_path, "a/1.jpg", "b/readme.txt", "c/1.jpg")
    os.makedirs(tmp_path / "d")
    with pytest.warns(UserWarning, match="no images") as record:
        s = scan_folder(str(tmp_path))
    assert s.classes == ["a", "b", "c", "d"]  # kept, so class indices match the folder names
    assert s.counts() == [1, 0, 1, 0]
    assert len(s.warnings) == 2
    assert any(os.path.join(str(tmp_path), "b") in w for w in s.warnings)
    assert any(os.path.join(str(tmp_path), "d") in w for w in s.warnings)
    assert sorted(str(w.message) for w in record) == sorted(s.warnings)


def test_no_warning_when_every_class_has_images(tmp_path):
    put(tmp_path, "a/1.jpg", "b/1.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_folder(str(tmp_path))


def test_folder_without_images_is_a_one_line_error(tmp_path):
    put(tmp_path, "a/readme.txt", "b/data.csv")
    with pytest.raises(FinegrainError) as excinfo:
        scan_folder(str(tmp_path))
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert "no images" in msg and str(tmp_path) in msg and ".jpg" in msg  # says where and what it looked for


def test_folder_without_class_folders_explains_the_layout(tmp_path):
    put(tmp_path, "1.jpg", "2.jpg")  # loose images, no class folders
    with pytest.raises(FinegrainError) as excinfo:
        scan_folder(str(tmp_path))
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert "class" in msg and "<class>" in msg


def test_missing_path_is_an_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FinegrainError, match="nowhere"):
        scan_folder(missing)
    with pytest.raises(FinegrainError, match="does not exist"):
        load_image_set(missing)
    with pytest.raises(FinegrainError, match="does not exist"):
        load_image_set(missing + ".csv")


def test_a_file_is_not_a_folder(tmp_path):
    put(tmp_path, "a.jpg")
    with pytest.raises(FinegrainError, match="not a folder"):
        scan_folder(str(tmp_path / "a.jpg"))


# --- CSV manifests ---


def test_manifest_relative_paths_are_from_the_csv_folder(tmp_path):
    put(tmp_path, "imgs/1.jpg", "imgs/2.jpg", "other/3.png")
    other = tmp_path / "elsewhere"
    other.mkdir()
    absolute = os.path.abspath(tmp_path / "other" / "3.png")
    csv_path = write_csv(tmp_path / "m.csv", f"path,label\nimgs/1.jpg,wren\n../{tmp_path.name}/imgs/2.jpg,robin\n")
    with open(csv_path, "a", encoding="utf-8") as f:
        f.write(f"{absolute},wren\n")
    cwd = os.getcwd()
    os.chdir(other)  # relative to the CSV, not to the working directory
    try:
        s = read_manifest(csv_path)
    finally:
        os.chdir(cwd)
    assert s.classes == ["robin", "wren"]
    assert [x.label for x in s.samples] == [1, 0, 1]
    assert all(os.path.isfile(x.path) and os.path.isabs(x.path) for x in s.samples)
    assert s.samples[2].path == absolute
    assert s.splits == ["all"]


def test_manifest_split_column(tmp_path):
    put(tmp_path, "1.jpg", "2.jpg", "3.jpg", "4.jpg")
    body = "Path, Label ,SPLIT\n1.jpg,b,train\n2.jpg,a,train\n3.jpg,b,val\n4.jpg,c,test\n"
    s = read_manifest(write_csv(tmp_path / "m.csv", body))
    assert s.classes == ["a", "b", "c"]
    assert s.splits == ["train", "val", "test"]
    assert s.counts("train") == [1, 1, 0]
    assert [os.path.basename(x.path) for x in s.split("val")] == ["3.jpg"]
    assert s.counts() == [1, 2, 1]


def test_manifest_with_utf8_bom_and_blank_split(tmp_path):
    put(tmp_path, "1.jpg", "2.jpg")
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffpath,label,split\n1.jpg,a,\n2.jpg,a, \n3.jpg,a,train\n".encode())
    s = read_manifest(str(path))  # the BOM must not hide the "path" column; a blank split means "all"
    assert [x.split for x in s.samples] == ["all", "all", "train"]


def test_unknown_split_names_come_after_train_val_test_in_a_stable_order(tmp_path):
    names = ["zeta", "test", "eta", "beta", "train", "delta", "alpha", "gamma"]
    rows = "".join(f"{i}.jpg,a,{name}\n" for i, name in enumerate(names))
    s = read_manifest(write_csv(tmp_path / "m.csv", "path,label,split\n" + rows))
    assert s.splits == ["train", "test", "alpha", "beta", "delta", "eta", "gamma", "zeta"]


@pytest.mark.parametrize("header", ["file,class", "path,species", "", "1.jpg,a"])
def test_manifest_bad_header_is_an_error(tmp_path, header):
    put(tmp_path, "1.jpg")
    csv_path = write_csv(tmp_path / "m.csv", f"{header}\n1.jpg,a\n" if header else "")
    with pytest.raises(FinegrainError) as excinfo:
        read_manifest(csv_path)
    msg = str(excinfo.value)
    assert "\n" not in msg and "path,label" in msg


def test_manifest_row_without_label_is_an_error(tmp_path):
    put(tmp_path, "1.jpg", "2.jpg")
    csv_path = write_csv(tmp_path / "m.csv", "path,label\n1.jpg,a\n2.jpg\n")
    with pytest.raises(FinegrainError) as excinfo:
        read_manifest(csv_path)
    msg = str(excinfo.value)
    assert "\n" not in msg and "no label" in msg and "line 3" in msg and "2.jpg" in msg  # names the offending row


def test_manifest_with_no_rows_is_an_error(tmp_path):
    with pytest.raises(FinegrainError, match="no images"):
        read_manifest(write_csv(tmp_path / "m.csv", "path,label\n"))


def test_load_image_set_dispatches_on_csv(tmp_path):
    put(tmp_path, "data/a/1.jpg", "data/b/1.jpg", "data/b/2.jpg")
    folder = load_image_set(str(tmp_path / "data"))
    assert folder.classes == ["a", "b"] and folder.counts() == [1, 2]
    csv_path = write_csv(tmp_path / "LIST.CSV", "path,label\ndata/a/1.jpg,x\n")
    manifest = load_image_set(csv_path)
    assert manifest.classes == ["x"] and manifest.counts() == [1]
    assert manifest.samples[0].path == os.path.abspath(tmp_path / "data" / "a" / "1.jpg")


# --- ImageSet ---


def test_counts_and_split(tmp_path):
    put(tmp_path, "train/a/1.jpg", "train/a/2.jpg", "train/b/1.jpg", "test/b/1.jpg")
    s = scan_folder(str(tmp_path))
    assert s.counts() == [2, 2]
    assert s.counts("train") == [2, 1]
    assert s.counts("val") == [0, 0]  # counts of a missing split are zeros, one per class
    assert len(s.split("train")) == 3
    with pytest.raises(FinegrainError) as excinfo:
        s.split("val")
    msg = str(excinfo.value)
    assert "'val'" in msg and "train" in msg and "test" in msg  # says which splits do exist
