"""`make demo`: the main job on the bundled samples (grows as the apps land)."""


def main() -> int:
    print("no demo yet: the apps have not landed. `make test` runs the suite.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
