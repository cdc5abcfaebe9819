"""``python -m exitrl ...`` is the ``exitrl`` command (`exitrl.command`)."""

from exitrl.command import main

if __name__ == "__main__":
    main()
