from kvmfs.cli import main

raise SystemExit(main())
