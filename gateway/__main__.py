from gateway.lifeline import die_with_parent

die_with_parent()  # first: a child of serve ends with it (gateway.lifeline)

from gateway.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
