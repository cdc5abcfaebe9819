"""Task data: GLUE tasks from a local folder or the hub, and custom TSV/CSV/JSONL files."""

from exitrl.data.files import DataError, Table, read_table, require_columns
from exitrl.data.loading import DATA_DIR_ENV, TaskData, label_ids, load_task, read_texts, select_rows
from exitrl.data.tasks import GLUE_TASKS, TASK_NAMES, TaskSpec

__all__ = ["DATA_DIR_ENV", "DataError", "GLUE_TASKS", "TASK_NAMES", "Table", "TaskData", "TaskSpec", "label_ids",
           "load_task", "read_table", "read_texts", "require_columns", "select_rows"]
