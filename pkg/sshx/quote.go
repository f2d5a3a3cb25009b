package sshx

import (
	"errors"
	"fmt"
	"strings"
)

// Quote returns s as one word of a POSIX shell command line: s wrapped in
// single quotes, with each single quote inside s closed, escaped and
// reopened:
//
//	it's  ->  'it'\''s'
//
// Nothing inside single quotes is special to the shell, so the program
// receives s as is, whatever characters it holds.
func Quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Join quotes every argument of argv with [Quote] and joins them with
// spaces: the command line the remote shell reads. It refuses an empty argv
// and arguments holding a NUL byte, which no command line can carry.
func Join(argv []string) (string, error) {
	if len(argv) == 0 {
		return "", errors.New("empty command")
	}
	var b strings.Builder
	for i, a := range argv {
		if strings.IndexByte(a, 0) >= 0 {
			return "", fmt.Errorf("argument %d contains a NUL byte", i)
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(Quote(a))
	}
	return b.String(), nil
}

// inDir is a constant script: it changes to its first argument and runs
// the rest. Arguments reach it only as quoted positional parameters.
const inDir = `cd -- "$1" || exit 125
shift
exec "$@"`

// InDir returns an argv that runs argv in directory dir on the remote
// host, for commands without a -C or --project-directory option.
func InDir(dir string, argv ...string) []string {
	return append([]string{"sh", "-c", inDir, "sandboxer-cd", dir}, argv...)
}
