"""`make demo`: the main job on the bundled samples (not built yet)."""


def main() -> int:
    print("no demo yet: the end-to-end demo over all apps is still to be built.\n"
          "Each app runs on its bundled sample today, e.g.\n"
          "  .venv/bin/python -m apps.finance forecast train --run-dir runs/spy\n"
          "  .venv/bin/python -m apps.speech words train --run-dir runs/words\n"
          "  .venv/bin/python -m apps.nlp textgen train --run-dir runs/text --max-minutes 2\n"
          "`make test` runs the suite.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
