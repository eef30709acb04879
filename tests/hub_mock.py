"""A stand-in Hub for tests: uploads land in a local directory (no network)."""

import contextlib
import os
import shutil
from unittest import mock


@contextlib.contextmanager
def mock_hub(remote_dir):
    """Patch the `huggingface_hub` upload calls so that every repo `owner/name` is the folder `remote_dir/owner/name`.

    Yields the dict `{repo_id: folder}` of the repos written to.
    """
    repos = {}

    def folder(repo_id):
        path = os.path.join(str(remote_dir), *repo_id.split("/"))
        os.makedirs(path, exist_ok=True)
        repos[repo_id] = path
        return path

    def create_repo(self, repo_id, *args, **kwargs):
        folder(repo_id)
        return mock.MagicMock(repo_id=repo_id)

    def create_commit(self, repo_id, operations, *args, **kwargs):
        target = folder(repo_id)
        for op in operations:
            dest = os.path.join(target, op.path_in_repo)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            src = op.path_or_fileobj
            if isinstance(src, (str, os.PathLike)):
                shutil.copyfile(src, dest)
            else:
                with open(dest, "wb") as f:
                    f.write(src if isinstance(src, bytes) else src.read())
        return mock.MagicMock(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kwargs):
        target = os.path.join(folder(repo_id), path_in_repo or "")
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        return mock.MagicMock(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        create_commit(self, repo_id, [mock.MagicMock(path_or_fileobj=path_or_fileobj, path_in_repo=path_in_repo)])
        return f"https://huggingface.co/{repo_id}/blob/main/{path_in_repo}"

    card = mock.MagicMock()
    card.save = lambda path: open(path, "w").write("---\nlibrary_name: hf_realm\n---\n")
    with (
        mock.patch("huggingface_hub.HfApi.create_repo", create_repo),
        mock.patch("huggingface_hub.HfApi.create_commit", create_commit),
        mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder),
        mock.patch("huggingface_hub.HfApi.upload_file", upload_file),
        mock.patch("transformers.utils.hub.create_and_tag_model_card", return_value=card),
    ):
        yield repos
