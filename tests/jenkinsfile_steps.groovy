// Reads a Jenkinsfile with Groovy's own parser and prints, one JSON object per line, the calls the tests
// check: every `sh` step's script, the matrix `values`, the `stash`/`unstash` names and the `choice`
// parameters' name and choices, and the `archiveArtifacts`/`publishHTML` steps with their named arguments
// (`named`: maps and lists as JSON, constants with their type). Each call carries the innermost `stage` it is
// in. GString arguments are printed as written (their text), so "${RECIPE}" stays visible.
//
//   groovy tests/jenkinsfile_steps.groovy Jenkinsfile
import groovy.json.JsonOutput
import org.codehaus.groovy.ast.CodeVisitorSupport
import org.codehaus.groovy.ast.builder.AstBuilder
import org.codehaus.groovy.ast.expr.*
import org.codehaus.groovy.ast.stmt.BlockStatement
import org.codehaus.groovy.control.CompilePhase

def text(Expression e) {
    if (e instanceof ConstantExpression) return e.value?.toString()
    if (e instanceof GStringExpression) return e.text
    if (e instanceof BinaryExpression) return text(e.leftExpression) + text(e.rightExpression)
    return e.text
}

def value(Expression e) {
    if (e instanceof MapExpression) return e.mapEntryExpressions.collectEntries { [(text(it.keyExpression)): value(it.valueExpression)] }
    if (e instanceof ListExpression) return e.expressions.collect { value(it) }
    if (e instanceof ConstantExpression) return e.value
    return text(e)
}

def found = []
def stages = []
def visitor = new CodeVisitorSupport() {
    void visitMethodCallExpression(MethodCallExpression call) {
        def name = call.methodAsString
        def args = call.arguments instanceof TupleExpression ? call.arguments.expressions : [call.arguments]
        if (name == 'stage' && args && args[0] instanceof ConstantExpression) {
            stages.push(args[0].value.toString())
            super.visitMethodCallExpression(call)
            stages.pop()
            return
        }
        if (name in ['archiveArtifacts', 'publishHTML']) {
            def named = [:]
            args.each { arg ->
                if (arg instanceof MapExpression || arg instanceof NamedArgumentListExpression) named.putAll(value(arg))
            }
            found << [step: name, line: call.lineNumber, stage: stages ? stages[-1] : null, args: [], named: named]
        }
        if (name in ['sh', 'values', 'stash', 'unstash', 'choice']) {
            def values = []
            args.each { arg ->
                if (arg instanceof MapExpression || arg instanceof NamedArgumentListExpression) {
                    arg.mapEntryExpressions.each { entry ->
                        def key = text(entry.keyExpression)
                        if (key in ['script', 'name']) values << text(entry.valueExpression)
                        if (key == 'choices' && entry.valueExpression instanceof ListExpression) {
                            entry.valueExpression.expressions.each { values << text(it) }
                        }
                    }
                } else if (!(arg instanceof ClosureExpression)) {
                    values << text(arg)
                }
            }
            found << [step: name, line: call.lineNumber, stage: stages ? stages[-1] : null, args: values]
        }
        super.visitMethodCallExpression(call)
    }
}
new AstBuilder().buildFromString(CompilePhase.CONVERSION, false, new File(args[0]).text).each { node ->
    if (node instanceof BlockStatement) node.visit(visitor)
}
found.each { println JsonOutput.toJson(it) }
