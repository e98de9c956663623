/** `qcow2img completion bash|zsh`: completion scripts made from the command descriptions. */
import { type CommandSpec, commands } from './spec';
import { parseChoice } from './options';

const topLevel = [...new Set(commands.map((c) => c.name.split(' ')[0]!)), 'help'];
const snapshotVerbs = commands.filter((c) => c.name.startsWith('snapshot ')).map((c) => c.name.split(' ')[1]!);

function optionWords(spec: CommandSpec): string[] {
  return [...spec.options.flatMap((o) => [`--${o.long}`, ...(o.short ? [`-${o.short}`] : [])]), '--help'];
}

export function bashCompletion(): string {
  const optionCases = commands.map((c) => `    '${c.name}') opts='${optionWords(c).join(' ')}' ;;`);
  const valueCases = commands.flatMap((c) =>
    c.options.filter((o) => o.choices).flatMap((o) => [`--${o.long}`, ...(o.short ? [`-${o.short}`] : [])].map((flag) => `    '${c.name} ${flag}') COMPREPLY=($(compgen -W '${o.choices!.join(' ')}' -- "$cur")); return ;;`)),
  );
  return `# bash completion for qcow2img (qcow2img completion bash)
_qcow2img() {
  local cur=\${COMP_WORDS[COMP_CWORD]} prev=\${COMP_WORDS[COMP_CWORD-1]}
  local -a words=()
  local i
  for ((i = 1; i < COMP_CWORD; i++)); do
    [[ \${COMP_WORDS[i]} == -* ]] || words+=("\${COMP_WORDS[i]}")
  done
  local cmd=\${words[0]-}
  if [[ -z $cmd ]]; then
    COMPREPLY=($(compgen -W '${topLevel.join(' ')}' -- "$cur"))
    return
  fi
  if [[ $cmd == help ]]; then
    COMPREPLY=($(compgen -W '${topLevel.filter((w) => w !== 'help').join(' ')}' -- "$cur"))
    return
  fi
  if [[ $cmd == snapshot ]]; then
    if [[ \${#words[@]} -lt 2 ]]; then
      COMPREPLY=($(compgen -W '${snapshotVerbs.join(' ')}' -- "$cur"))
      return
    fi
    cmd="snapshot \${words[1]}"
  fi
  case "$cmd $prev" in
${valueCases.join('\n')}
  esac
  if [[ $cur == -* ]]; then
    local opts=''
    case "$cmd" in
${optionCases.join('\n')}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    return
  fi
  COMPREPLY=($(compgen -f -- "$cur"))
}
complete -o filenames -F _qcow2img qcow2img
`;
}

/** zsh's _arguments wants [help] without brackets or colons in it. */
function zshText(text: string): string {
  return text.replace(/[[\]:]/g, ' ').replace(/'/g, "'\\''");
}

export function zshCompletion(): string {
  const describe = (list: readonly CommandSpec[], leaf: boolean) =>
    list.map((c) => `'${leaf ? c.name.split(' ')[1] : c.name.split(' ')[0]}:${zshText(c.summary)}'`).join(' ');
  const cases = commands.map((c) => {
    const specs = c.options.flatMap((o) => {
      const value = o.value ? `:${zshText(o.value)}:${o.choices ? `(${o.choices.join(' ')})` : o.value === 'DIR' ? '_files -/' : o.parse ? ' ' : '_files'}` : '';
      const repeat = o.repeatable ? '*' : '';
      return [`'${repeat}--${o.long}[${zshText(o.help)}]${value}'`, ...(o.short ? [`'${repeat}-${o.short}[${zshText(o.help)}]${value}'`] : [])];
    });
    return `    '${c.name}') _arguments ${[...specs, "'*:file:_files'"].join(' ')} ;;`;
  });
  const top = commands.filter((c) => !c.name.startsWith('snapshot '));
  return `#compdef qcow2img
# zsh completion for qcow2img (qcow2img completion zsh > "\${fpath[1]}/_qcow2img")
_qcow2img() {
  local -a cmds verbs
  cmds=(${describe(top, false)} 'snapshot:VM snapshots' 'help:the options of a command')
  verbs=(${describe(commands.filter((c) => c.name.startsWith('snapshot ')), true)})
  if (( CURRENT == 2 )); then
    _describe 'command' cmds
    return
  fi
  local cmd=\${words[2]}
  if [[ $cmd == snapshot ]]; then
    if (( CURRENT == 3 )); then
      _describe 'snapshot command' verbs
      return
    fi
    cmd="snapshot \${words[3]}"
    shift 2 words
    (( CURRENT -= 2 ))
  else
    shift words
    (( CURRENT-- ))
  fi
  case $cmd in
${cases.join('\n')}
    help) _describe 'command' cmds ;;
  esac
}
_qcow2img "$@"
`;
}

export async function run([shell]: string[]): Promise<void> {
  const which = parseChoice(shell!, 'SHELL', ['bash', 'zsh']);
  process.stdout.write(which === 'bash' ? bashCompletion() : zshCompletion());
}
