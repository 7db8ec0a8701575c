from fire_opd.cli.main import main

raise SystemExit(main())
