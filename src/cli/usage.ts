/** Usage errors of the CLI. */

/** A mistake in the command line: one line, then a pointer to the command's --help. */
export class UsageError extends Error {
  /** The command whose --help to point at ("load", "snapshot create"); undefined: the top level. */
  command: string | undefined;
  constructor(message: string, command?: string) {
    super(message);
    this.command = command;
  }
}
